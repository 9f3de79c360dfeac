"""M2N2 in weight space (issue 15): members are data, crossovers are slerps of flattened weights.

Independent truths: the flattened weights are read here from the checkpoints (float tensors in
sorted name order, float64); the crossover is re-derived from its formula (split-point slerp with
``Omega`` from the whole vectors, lerp when ``sin Omega <= 1e-6``) on those dense vectors; Gram
matrices are ``X X^T`` of the dense slices. Runs use the digits zoo (a trial costs ~0.1 s).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from helpers import make_family
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.merge.checkpoints import load_state_dict
from evomerge.merge.engine import Merger
from evomerge.merge.segments import (
    RECORD,
    PrefixGram,
    build_into,
    crossover,
    dense,
    inner,
    source_member,
    zero_member,
)
from evomerge.recipe import RecipeError, SegmentRecipe
from evomerge.recipe.segments import Member, layout_of


def flat(path: Path) -> np.ndarray:
    """A checkpoint's float parameters, sorted by tensor name, flattened, float64."""
    state = load_state_dict(path)
    names = sorted(n for n, t in state.items() if t.is_floating_point())
    return np.concatenate([state[n].reshape(-1).double().numpy() for n in names])


def literal_slerp(a: np.ndarray, b: np.ndarray, split: int, mix: float) -> np.ndarray:
    """The reference's crossover on dense vectors, from its formula."""
    t = np.where(np.arange(len(a)) < split, mix, 1.0 - mix)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    omega = np.arccos(np.clip(a @ b / (na * nb), -1, 1))
    if np.sin(omega) <= 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), n_sources=3, hidden=16,
                       intermediate=32, layers=2)


@pytest.fixture(scope="module")
def oracle(family):
    states = [load_state_dict(p) for p in family.sources]
    layout = layout_of({n: t.numel() for n, t in states[0].items() if t.is_floating_point()})
    return PrefixGram(states, layout, block=1000)


# ---- the algebra ---------------------------------------------------------------------------------


def test_prefix_gram_equals_direct_gram_on_random_segments_and_block_edges():
    rng = np.random.default_rng(0)
    shapes = {"b.weight": (7, 5), "a.bias": (3,), "c.weight": (11, 4), "d": (1,)}
    sources = [{n: torch.randn(s, generator=torch.Generator().manual_seed(10 * k + i))
                for i, (n, s) in enumerate(shapes.items())} for k in range(3)]
    sources[0]["mask"] = torch.ones(3, dtype=torch.bool)  # not a parameter
    layout = layout_of({n: t.numel() for n, t in sources[0].items() if t.is_floating_point()})
    assert layout.names == ("a.bias", "b.weight", "c.weight", "d")
    x = np.stack([np.concatenate([s[n].reshape(-1).double().numpy() for n in layout.names])
                  for s in sources])
    d, block = layout.size, 8
    assert d == 83
    oracle = PrefixGram(sources, layout, block=block)
    edges = [(0, d), (0, 1), (d - 1, d), (0, block), (block, 2 * block), (block - 1, block + 1),
             (3, 5), (2 * block + 1, 2 * block + 2), (8 * block, d), (3, 3 + 35), (38, 82)]
    random = [tuple(sorted(rng.choice(d + 1, 2, replace=False))) for _ in range(40)]
    scale = np.abs(x @ x.T).max()
    for a, b in edges + random:
        got = oracle(np.array([a, b]))[0]
        np.testing.assert_allclose(got, x[:, a:b] @ x[:, a:b].T, rtol=0, atol=1e-12 * scale,
                                   err_msg=f"segment [{a}, {b})")
    # consecutive segments sum to the whole
    cuts = np.array([0, 5, 8, 16, 17, 40, d])
    np.testing.assert_allclose(oracle(cuts).sum(axis=0), x @ x.T, atol=1e-12 * scale)


def test_a_chain_of_crossovers_is_the_weight_space_slerp_of_the_parents(family, oracle):
    x = np.stack([flat(p) for p in family.sources])
    d = x.shape[1]
    s0, s1, s2 = (source_member(k, 3, d) for k in range(3))
    zero = zero_member(3, d)
    rng = np.random.default_rng(1)
    members = {"s0": s0, "s1": s1, "s2": s2, "zero": zero}
    vectors = {"s0": x[0], "s1": x[1], "s2": x[2], "zero": np.zeros(d)}
    chain = [("c1", "s0", "s1"), ("c2", "s1", "s2"), ("c3", "c1", "c2"), ("c4", "c3", "s0"),
             ("c5", "c4", "c2"), ("c6", "c5", "zero"), ("c7", "c5", "c5"), ("c8", "c6", "c3")]
    for name, a, b in chain:
        split, mix = int(rng.integers(0, d)), float(rng.random())
        members[name] = crossover(members[a], members[b], split, mix, oracle)
        vectors[name] = literal_slerp(vectors[a], vectors[b], split, mix)
        np.testing.assert_allclose(dense(members[name], x), vectors[name], rtol=1e-6,
                                   atol=1e-9 * np.abs(vectors[name]).max(), err_msg=name)
    # children of children carry more segments, still one linear combination on each
    assert len(members["c8"].coefs) > len(members["c1"].coefs) >= 2
    # the geometry is that of the dense vectors
    assert inner(members["c3"], members["c5"], oracle) == pytest.approx(
        vectors["c3"] @ vectors["c5"], rel=1e-9)
    # a crossover at split 0 is one mix everywhere (t = 1 - mix): the lerp/slerp of the sources
    whole = crossover(s0, s1, 0, 0.25, oracle)
    np.testing.assert_allclose(dense(whole, x), literal_slerp(x[0], x[1], 0, 0.25), rtol=1e-9)
    assert len(whole.coefs) == 1


def test_the_engine_builds_a_member_as_its_dense_weights(family, oracle):
    x = np.stack([flat(p) for p in family.sources])
    d = x.shape[1]
    member = crossover(crossover(source_member(0, 3, d), source_member(2, 3, d), d // 3, 0.3,
                                 oracle), source_member(1, 3, d), 2 * d // 3 + 7, 0.8, oracle)
    recipe = SegmentRecipe.of_member(member, [str(p) for p in family.sources], oracle.layout)
    merger = Merger([str(p) for p in family.sources], chunk=97)  # chunks cut the segments too
    built = build_into(recipe, merger, merger.allocate())
    names = sorted(n for n, t in built.items() if t.is_floating_point())
    got = np.concatenate([built[n].reshape(-1).double().numpy() for n in names])
    np.testing.assert_array_equal(got, dense(member, x).astype(np.float32))
    # a source alone is that source, bit for bit
    alone = SegmentRecipe.of_member(source_member(1, 3, d), recipe.models, oracle.layout)
    built = build_into(alone, merger, merger.allocate())
    reference = load_state_dict(family.sources[1])
    assert all(torch.equal(built[n], reference[n]) for n in reference)


# ---- the recipe ----------------------------------------------------------------------------------


def test_recipe_round_trips_yaml_and_json_and_exports_a_loadable_checkpoint(family, oracle,
                                                                             tmp_path):
    x = np.stack([flat(p) for p in family.sources])
    d = x.shape[1]
    member = crossover(source_member(0, 3, d), source_member(1, 3, d), 1234, 0.35, oracle)
    recipe = SegmentRecipe.of_member(member, [str(p) for p in family.sources], oracle.layout)
    path = tmp_path / "member.yaml"
    path.write_text(recipe.to_yaml())
    assert "mergekit cannot express sub-tensor segments" in path.read_text()
    assert SegmentRecipe.from_yaml(path) == recipe
    assert SegmentRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.member == member

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    names = sorted(n for n in load_state_dict(family.sources[0]))
    got = np.concatenate([state[n].reshape(-1).double().numpy() for n in names])
    np.testing.assert_allclose(got, literal_slerp(x[0], x[1], 1234, 0.35), rtol=1e-6, atol=1e-7)


def test_a_bad_recipe_is_one_error_naming_every_problem(family, oracle, tmp_path):
    good = SegmentRecipe.of_member(source_member(0, 3, oracle.layout.size),
                                   [str(p) for p in family.sources], oracle.layout).to_dict()
    bad = {**good, "boundaries": [0, 5, 5, oracle.layout.size + 1], "coefficients": [[1, 0]],
           "extra": 1}
    with pytest.raises(RecipeError) as err:
        SegmentRecipe.from_dict({k: v for k, v in bad.items() if k != "extra"})
    text = str(err.value)
    assert "boundaries: must rise strictly" in text
    assert "coefficients: 1 rows for 3 segments" in text
    assert "rows [0] need 3 finite numbers" in text
    with pytest.raises(RecipeError, match="unknown key"):
        SegmentRecipe.from_dict(bad)
    # built on models of another layout: refused before anything is written
    other = {**good, "parameters": 10, "boundaries": [0, 10]}
    merger = Merger([str(p) for p in family.sources])
    with pytest.raises(RecipeError, match="not the layout the recipe was made for"):
        build_into(SegmentRecipe.from_dict(other), merger, merger.allocate())


# ---- the strategy --------------------------------------------------------------------------------


def test_m2n2_weights_mode_asks_records_and_members_and_replays_them(oracle):
    from evomerge.search import make_strategy

    d = oracle.layout.size
    lower, upper = [-1, -1, -1, 0, 0], [2, 99, 99, d, 1]

    def run() -> list:
        s = make_strategy("m2n2", lower=lower, upper=upper, directions=["maximize"], seed=3,
                          archive=4, crossover="weights", geometry=oracle)
        asked = []
        rng = np.random.default_rng(0)
        for _ in range(6):
            cands = s.ask()
            asked += cands
            s.tell(cands, [[0.5]] * len(cands),
                   item_scores=[rng.integers(0, 2, 10).astype(float) for _ in cands])
        return asked

    first, again = run(), run()
    assert [c.x.tolist() for c in first] == [c.x.tolist() for c in again]
    assert all(a.meta["member"] == b.meta["member"] for a, b in zip(first, again))
    # generation 0: each source alone; then children whose record names their parents
    assert [c.x.tolist() for c in first[:3]] == [[k, -1, -1, 0, 0] for k in range(3)]
    assert all(c.meta["member"] == source_member(k, 3, d) for k, c in enumerate(first[:3]))
    for c in first[3:]:
        record = c.meta["record"]
        assert c.x.tolist() == [-1, record.parent_a, record.parent_b, record.split, record.mix]
        assert isinstance(c.meta["member"], Member)


def test_m2n2_crossover_options_are_checked():
    from evomerge.search import make_strategy

    box = {"lower": [0, 0], "upper": [1, 1], "directions": ["maximize"]}
    with pytest.raises(ValueError, match="needs the weights space"):
        make_strategy("m2n2", crossover="weights", **box)
    with pytest.raises(ValueError, match="crossover: coefficients, weights, got 'both'"):
        make_strategy("m2n2", crossover="both", **box)


# ---- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from run_helpers import build_zoo

    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def weights_experiment(zoo, run_dir: Path, budget: int) -> dict:
    from run_helpers import experiment_data

    data = experiment_data("m2n2_weights", zoo, run_dir, budget=budget)
    data["strategy"]["archive"] = 6
    return data


def test_bad_pairings_are_one_error_naming_both_fixes(zoo, tmp_path):
    from evomerge.execution.plan import Plan
    from evomerge.experiment import Experiment, ExperimentError

    data = weights_experiment(zoo, tmp_path / "run", 10)
    cmaes = {**data, "strategy": {"name": "cmaes", "popsize": 4}}
    with pytest.raises(ExperimentError) as err:
        Plan(Experiment.from_dict(cmaes))
    assert "use strategy: {name: m2n2, crossover: weights}, or a coefficient space" in str(
        err.value)
    coefficients = {**data, "strategy": {**data["strategy"], "crossover": "coefficients"}}
    with pytest.raises(ExperimentError, match="with space: {kind: weights} use crossover: "
                                              "weights, or keep crossover: coefficients"):
        Plan(Experiment.from_dict(coefficients))
    boxed = {**data, "space": {"method": "task_arithmetic",
                               "params": [{"name": "weight", "per": "layer",
                                           "bounds": [0.0, 1.0]}]}}
    with pytest.raises(ExperimentError, match="needs space: {kind: weights}; set it, or use "
                                              "crossover: coefficients"):
        Plan(Experiment.from_dict(boxed))
    reduced = {**data, "fitness": {**data["fitness"], "reduced": {"anchors": 5}},
               "space": {"kind": "weights", "blocks": 3}}
    with pytest.raises(ExperimentError) as err:
        Plan(Experiment.from_dict(reduced))
    text = str(err.value)  # both problems of the file, in one error
    assert "fitness.reduced: IRT calibration" in text and "blocks" in text


@pytest.mark.slow
def test_a_weights_run_is_deterministic_and_its_best_is_its_member(zoo, tmp_path):
    from run_helpers import by_slot, load_trials, run_in_process

    budget = 16
    runs = []
    for name in ("a", "b"):
        data = weights_experiment(zoo, tmp_path / name, budget)
        data["export"] = name == "a"
        summary = run_in_process(data)
        runs.append((summary, by_slot(load_trials(tmp_path / name, data["name"]))))
    (first, slots), (second, again) = runs
    assert first["n_trials"] == budget and first["n_failed"] == 0
    assert slots == again and first["best"] == second["best"]
    records = [dict(zip(sorted(RECORD), slots[k][0])) for k in sorted(slots)]  # by_slot sorts
    assert [r["source"] for r in records[:2]] == [0, 1]  # generation 0: each expert alone
    assert all(r["source"] == -1 and r["parent_a"] >= -1 for r in records[2:])  # then children
    # the best trial's recipe is a segments member, and the exported model has its weights
    recipe = SegmentRecipe.from_dict(first["best"]["recipe"])
    sources = list(data["models"]["sources"].values())
    assert list(recipe.models) == sources
    x = np.stack([flat(Path(p)) for p in sources])
    np.testing.assert_allclose(flat(tmp_path / "a" / "best_model"),
                               dense(recipe.member, x), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_killed_weights_run_resumes_to_the_uninterrupted_trajectory(zoo, tmp_path):
    from run_helpers import (
        by_slot,
        cli,
        counted,
        kill_group,
        load_trials,
        run_cli,
        run_in_process,
        slot,
        start,
        state_counts,
        wait_until,
        write_experiment,
    )

    budget = 30
    reference = weights_experiment(zoo, tmp_path / "reference", budget)
    run_in_process(reference)
    expected = by_slot(load_trials(tmp_path / "reference", reference["name"]))

    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path / "exp.yaml", weights_experiment(zoo, run_dir, budget))
    proc = start(cli("run", exp), tmp_path / "run.log")
    try:
        wait_until(lambda: state_counts(run_dir)["COMPLETE"] >= 12, timeout=120, proc=proc,
                   log=tmp_path / "run.log", what="twelve complete trials")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert state_counts(run_dir)["COMPLETE"] < budget
    result = run_cli(cli("resume", run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(run_dir, reference["name"])
    done = counted(trials)  # every slot once, nothing left queued, the same trajectory
    assert len(done) == budget == len({slot(t) for t in done})
    assert all(t.state.is_finished() for t in trials)
    assert by_slot(trials) == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["recipe"] == yaml.safe_load(
        (tmp_path / "reference" / "best_recipe.yaml").read_text())


@pytest.mark.slow
def test_the_shipped_tinylm_weights_experiment_runs_and_starts_from_the_experts(tmp_path):
    """``experiments/tinylm_m2n2_weights.yaml`` on the tiny zoo, few items: generation 0 scores
    exactly what the summary's own evaluation of each expert scores (a unit coefficient copies
    the expert), and every later trial stores a segments member with a crossover record."""
    from run_helpers import load_trials

    from evomerge.experiment import Experiment
    from evomerge.store import META
    from evomerge.zoo.tinylm import build_tinylm_zoo

    zoo = tmp_path / "zoo"
    build_tinylm_zoo(zoo, seed=0, size="tiny", progress=False)
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments"
                           / "tinylm_m2n2_weights.yaml").read_text())
    sources = data["models"]["sources"]
    data["models"] = {"base": str(zoo / "base"),
                      "sources": {k: str(zoo / Path(v).name) for k, v in sources.items()}}
    data["fitness"].update(max_items=6, tasks=[*data["fitness"]["tasks"], "sort_mc"])
    data["strategy"]["archive"] = 5
    budget = len(sources) + 6
    data.update(budget=budget, run_dir=str(tmp_path / "run"), export=False)

    summary = run_experiment(Experiment.from_dict(data), progress=False)

    assert summary["n_trials"] == budget and summary["n_failed"] == 0
    trials = sorted(load_trials(tmp_path / "run", data["name"]), key=lambda t: t.number)
    firsts = [t.values[0] for t in trials[:len(sources)]]
    assert firsts == pytest.approx([summary["sources"][k]["mean_acc"] for k in sources], abs=1e-12)
    for k, t in enumerate(trials):
        recipe = SegmentRecipe.from_dict(t.user_attrs[META]["recipe"])
        record = [t.params[name] for name in RECORD]
        if k < len(sources):
            assert record == [k, -1, -1, 0, 0] and recipe.member == source_member(
                k, len(sources), recipe.parameters)
        else:
            assert record[0] == -1 and 0 <= record[3] <= recipe.parameters


@pytest.mark.slow
def test_m2n2_modes_benchmark_runs_and_members_reproduce_the_dense_reference_run():
    """``benchmarks/m2n2_modes.py --quick`` (digits and reference parts) prints one JSON object;
    on the reference setting the weights-mode strategy makes the dense run's children, record for
    record, and reports the same test accuracy."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "m2n2_modes.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--parts", "digits",
                           "reference", "--json"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    budget = result["budgets"]["reference"]
    for run in result["reference"].values():
        assert run["equal_records"] == budget
        assert run["weights"]["test_acc"] == run["dense"]["test_acc"]
    for run in result["digits"].values():
        assert set(run) == {"weights", "coefficients"}
        assert all(0 < r["heldout"] <= 1 and r["failed"] == 0 for r in run.values())
        assert 1 <= run["weights"]["segments"] and run["weights"]["coef_sum"][0] > 0
