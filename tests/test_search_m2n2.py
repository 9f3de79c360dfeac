"""M2N2 (natural niches): the formulas on hand-worked examples, the strategy's determinism and
steady state, resume by replay through the driver, and the compact from-scratch record."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.execution.driver import run_experiment
from evomerge.search import make_strategy
from evomerge.search.m2n2 import (
    ChildRecord,
    FlatDigitsMLP,
    Niches,
    attraction,
    probabilities,
    reference_digits,
    replacement,
    scratch_search,
    shared_fitness,
    slerp_split,
    split_mix,
)

# Three members, four items. z = [2, 1, 1, 1]; S / z = [.5 1 1 0], [.5 0 0 0], [0 0 0 1].
S = np.array([[1, 1, 1, 0],
              [1, 0, 0, 0],
              [0, 0, 0, 1]], dtype=float)


# ---- formulas -----------------------------------------------------------------------------------


def test_shared_fitness_divides_each_item_among_its_solvers():
    np.testing.assert_allclose(shared_fitness(S, 1.0), [0.5 + 1 + 1, 0.5, 1.0])
    # alpha = 0 is plain accuracy counting (the GA baseline)
    np.testing.assert_allclose(shared_fitness(S, 0.0), [3, 1, 1])
    # an item nobody solves contributes nothing and does not divide by zero
    np.testing.assert_allclose(shared_fitness(np.zeros((2, 3)), 1.0), [0, 0])


def test_attraction_counts_what_b_solves_where_a_is_weak():
    # A = 1 (right only on item 0, shared): member 0 brings items 1 and 2, member 2 item 3
    np.testing.assert_allclose(attraction(S, 1, 1.0), [2.0, 0.0, 1.0])
    # A = 0: only member 2 solves something A misses
    np.testing.assert_allclose(attraction(S, 0, 1.0), [0.0, 0.0, 1.0])


def test_probabilities_normalise_and_fall_back_where_the_reference_divides_by_zero():
    np.testing.assert_allclose(probabilities([1.0, 3.0]), [0.25, 0.75])
    np.testing.assert_allclose(probabilities([0.0, 0.0], fallback=[2.0, 6.0]), [0.25, 0.75])
    np.testing.assert_allclose(probabilities([0.0, 0.0, 0.0]), [1 / 3] * 3)


def test_replacement_replaces_the_worst_with_the_child_in_z():
    # child [0 1 0 1]: z = [2 2 1 2]; f = [2.0, .5, .5], child 1.0 -> row 1 (first of the tie)
    assert replacement(S, np.array([0, 1, 0, 1.0])) == 1
    # child [0 0 1 1]: z = [2 1 2 2]; f = [2.0, .5, .5], child 1.0 -> row 1 again
    assert replacement(S, np.array([0, 0, 1, 1.0])) == 1
    # a child solving nothing has f = 0 < every member: discarded
    assert replacement(S, np.zeros(4)) is None
    # an empty slot (all zeros) goes first, even before a zero child (lower index wins the tie)
    with_empty = np.vstack([S, np.zeros(4)])
    assert replacement(with_empty, np.zeros(4)) == 3


def test_shared_fitness_can_evict_the_most_accurate_member_and_plain_accuracy_cannot():
    """What replacement does NOT guarantee: M2N2's archive keeps niches, not its best member.

    A (row 0) solves items 0-2, each also solved by two of six specialists, who each solve one
    of A's items plus an item of their own; the child solves two new items. With the child in z:
    z = 3 on items 0-2, so f_A = 3/3 = 1, each specialist 1/3 + 1 = 4/3, the child 2. A, the
    only member right on 3 items (the rest on 2), is the arg-min and is replaced: the archive's
    best accuracy drops from 3 to 2 items. With alpha = 0 (plain accuracy) f = [3, 2, ..., 2]
    and a specialist goes instead."""
    n = 3 + 6 + 2
    members = np.zeros((7, n))
    members[0, :3] = 1
    for k in range(6):
        members[1 + k, [k % 3, 3 + k]] = 1
    child = np.zeros(n)
    child[-2:] = 1
    ext = np.vstack([members, child])
    np.testing.assert_allclose(shared_fitness(ext, 1.0), [1.0] + [4 / 3] * 6 + [2.0])
    assert replacement(members, child, alpha=1.0) == 0
    assert members.sum(axis=1).argmax() == 0 and child.sum() < members[0].sum()
    assert replacement(members, child, alpha=0.0) == 1


def test_plain_accuracy_replacement_never_lowers_the_archive_best():
    """With alpha = 0 the evicted member has the fewest right answers of archive ∪ {child}, so
    the archive's best accuracy never drops (checked on random 0/1 archives)."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        members = (rng.random((rng.integers(2, 8), 12)) < rng.random()).astype(float)
        child = (rng.random(12) < rng.random()).astype(float)
        row = replacement(members, child, alpha=0.0)
        after = members.copy()
        if row is not None:
            after[row] = child
        assert after.sum(axis=1).max() >= members.sum(axis=1).max()
        assert after.sum() >= members.sum()  # and the total never drops either


def test_split_point_slerp_matches_the_hand_worked_vector():
    a, b = np.array([2.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0])  # Omega = pi / 2
    np.testing.assert_allclose(split_mix(3, 2, 0.25), [0.25, 0.25, 0.75])
    child = slerp_split(a, b, split=2, mix=0.25)
    s = math.sin(3 * math.pi / 8), math.sin(math.pi / 8)
    np.testing.assert_allclose(child, [2 * s[0], 3 * s[1], 0.0])
    # split 0: every coordinate takes 1 - mix
    np.testing.assert_allclose(slerp_split(a, b, 0, 0.25), [2 * s[1], 3 * s[0], 0.0])


def test_parallel_parents_fall_back_to_lerp():
    a, b = np.array([1.0, 2.0]), np.array([2.0, 4.0])  # sin Omega = 0
    np.testing.assert_allclose(slerp_split(a, b, split=0, mix=0.3), 0.3 * a + 0.7 * b)


def test_parents_are_drawn_from_fitness_and_attraction():
    niches = Niches(3, dim=2, n_items=4, seed=0)
    niches.scores[:] = S
    draws = [niches.parents(np.random.default_rng(k)) for k in range(6000)]
    a = np.bincount([d[0] for d in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(a, shared_fitness(S) / shared_fitness(S).sum(), atol=0.02)
    # given A = 1, B ~ attraction [2, 0, 1] / 3
    b = np.bincount([d[1] for d in draws if d[0] == 1], minlength=3)
    np.testing.assert_allclose(b / b.sum(), [2 / 3, 0, 1 / 3], atol=0.05)
    # given A = 0, only member 2 attracts
    assert {d[1] for d in draws if d[0] == 0} == {2}


# ---- the strategy (experts mode) ---------------------------------------------------------------

DIM, ITEMS = 4, 30
THRESHOLDS = np.linspace(-1, 1, ITEMS)


def items_of(x: np.ndarray) -> np.ndarray:
    """A synthetic per-item score: item j is solved when coordinate j % DIM exceeds a threshold,
    so different regions of the box own different items (niches)."""
    return (x[np.arange(ITEMS) % DIM] > THRESHOLDS).astype(float)


def drive(strategy, generations: int, fail_at: int | None = None):
    asked = []
    for g in range(generations):
        cands = strategy.ask()
        scores = [items_of(c.x) for c in cands]
        values = [[float(s.mean())] for s in scores]
        if g == fail_at:
            scores[0], values[0] = None, None
        strategy.tell(cands, values, item_scores=scores)
        asked.append(np.stack([c.x for c in cands]))
    return asked


def build(**options):
    return make_strategy("m2n2", lower=[-2.0] * DIM, upper=[2.0] * DIM,
                         directions=["maximize"], seed=5, **options)


def test_same_seed_and_results_ask_the_same_children():
    first = drive(build(popsize=3, mutation_std=0.1), 12, fail_at=4)
    again = drive(build(popsize=3, mutation_std=0.1), 12, fail_at=4)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    other = drive(make_strategy("m2n2", lower=[-2.0] * DIM, upper=[2.0] * DIM,
                                directions=["maximize"], seed=6, popsize=3, mutation_std=0.1), 3)
    assert not np.array_equal(first[2], other[2])


def test_generation_zero_is_the_init_points_and_children_stay_in_the_box():
    init = [[-1.5, 0, 0, 1.5], 1.0]
    strategy = build(init=init, popsize=4, mutation_std=1.0)
    asked = drive(strategy, 6)
    np.testing.assert_array_equal(asked[0], [[-1.5, 0, 0, 1.5], [1, 1, 1, 1]])
    assert all(len(a) == 4 for a in asked[1:])
    assert np.all(np.concatenate(asked) >= -2) and np.all(np.concatenate(asked) <= 2)


def test_popsize_one_is_the_reference_steady_state():
    """The strategy (init = the two random members, mutation on) and the from-scratch loop, one
    child at a time, make the same children and end with the same archive."""
    seed, std = 5, 0.3
    init = [np.random.default_rng([seed, s]).standard_normal(DIM) * std for s in range(2)]
    strategy = make_strategy("m2n2", lower=[-50.0] * DIM, upper=[50.0] * DIM,
                             directions=["maximize"], seed=seed, init=init, mutation_std=std)
    drive(strategy, 1 + 40)
    evaluate = lambda genomes: np.stack([items_of(g) for g in genomes])
    niches = scratch_search(evaluate, DIM, 42, seed=seed, init_std=std, mutation_std=std)
    np.testing.assert_array_equal(strategy.niches.steps, niches.steps)
    np.testing.assert_allclose(strategy.niches.genomes, niches.genomes, rtol=0, atol=1e-12)


def test_a_failed_child_scores_zero_and_never_displaces_a_member():
    """(Into an empty slot it would go, as in the reference: so fill the archive first.)"""
    strategy = build(popsize=2, archive=3)
    drive(strategy, 4)
    before = strategy.niches.steps.copy()
    assert np.all(before >= 0) and shared_fitness(strategy.niches.scores).min() > 0
    cands = strategy.ask()
    strategy.tell(cands, [None, None], item_scores=[None, None])
    np.testing.assert_array_equal(strategy.niches.steps, before)


@pytest.mark.parametrize("options, message", [
    ({"archive": 1}, "archive"),
    ({"alpha": -1}, "alpha"),
    ({"init": [[9, 0, 0, 0]]}, r"init\[0\]\[0\]"),
    ({"init": [[0, 0]]}, r"init\[0\]"),
    ({"popsize": 0}, "popsize"),
    ({"mutaton_std": 0.1}, "unknown mutaton_std"),
])
def test_bad_options_are_refused_before_any_compute(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


def weights_geometry(genomes: np.ndarray):
    """The Gram oracle of flat genomes (one "tensor" each), as the weights space builds it."""
    import torch

    from evomerge.merge.segments import PrefixGram
    from evomerge.recipe.segments import layout_of

    layout = layout_of({"genome": genomes.shape[1]})
    return PrefixGram([{"genome": torch.from_numpy(g)} for g in genomes], layout, block=7)


def test_weights_mode_makes_the_children_of_dense_weight_space_m2n2():
    """The strategy in weights mode (members + Gram oracle) and :func:`scratch_search` on the
    dense genomes draw the same parents, splits and mixes from the same archive states, so
    their records agree and every member is the dense child (fitness: a fixed random
    projection thresholded per item, so the scores depend on the weights themselves)."""
    from evomerge.merge.segments import dense

    rng = np.random.default_rng(5)
    experts = rng.normal(size=(3, 40))
    probe = rng.normal(size=(40, 12))

    def evaluate(genomes: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(genomes) @ probe > 0).astype(float)

    budget, records, genomes = 40, [], []

    def keep(recs, _scores):
        records.extend(r.as_list() for r in recs)

    dense_archive = scratch_search(evaluate, 40, budget, seed=9, archive=5, mutation_std=0.0,
                                   init=list(experts), on_batch=keep)
    strategy = make_strategy("m2n2", lower=[-1, -1, -1, 0, 0], upper=[2, budget, budget, 40, 1],
                             directions=["maximize"], seed=9, archive=5, crossover="weights",
                             geometry=weights_geometry(experts))
    mine = []
    while len(mine) < budget:
        cands = strategy.ask()
        for c in cands:
            genomes.append(dense(c.meta["member"], experts))
            r = c.meta.get("record")
            mine.append(r.as_list() if r else [len(mine), -1, -1, 0, 0.0])
        scores = list(evaluate(np.stack(genomes[-len(cands):])))
        strategy.tell(cands, [[float(v.mean())] for v in scores], item_scores=scores)
    assert mine == records
    rows = [dense(g, experts) for g in strategy.niches.genomes]
    np.testing.assert_allclose(rows, dense_archive.genomes, rtol=1e-9, atol=1e-12)


def test_weights_mode_options_are_checked():
    geometry = weights_geometry(np.ones((2, 4)))
    record = {"lower": [-1, -1, -1, 0, 0], "upper": [1, 9, 9, 4, 1], "directions": ["maximize"]}
    with pytest.raises(ValueError, match="mutation_std: 0.1 has no meaning"):
        make_strategy("m2n2", crossover="weights", geometry=geometry, mutation_std=0.1, **record)
    with pytest.raises(ValueError, match=r"init\[0\]: weight-space members start as sources"):
        make_strategy("m2n2", crossover="weights", geometry=geometry, init=[[0, 3, -1, 0, 0]],
                      **record)
    with pytest.raises(ValueError, match="a weights geometry was given"):
        make_strategy("m2n2", geometry=geometry, **record)


def test_tell_without_item_scores_says_what_is_missing():
    strategy = build()
    cands = strategy.ask()
    with pytest.raises(ValueError, match="needs item_scores"):
        strategy.tell(cands, [[0.5]] * len(cands))


# ---- resume by replay through the driver (experts mode) -----------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from run_helpers import build_zoo

    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


def test_resume_replays_stored_item_scores_and_continues_the_same_run(zoo, tmp_path):
    """A run stopped after 7 of 13 evaluations and resumed asks and scores exactly what an
    uninterrupted run does (the strategy is told each stored trial's per-item scores again)."""
    from run_helpers import by_slot, experiment_data, load_trials, run_in_process

    data = lambda run, budget: experiment_data("m2n2_experts", zoo, run, budget=budget)
    whole = tmp_path / "whole"
    run_in_process(data(whole, 13))
    part = tmp_path / "part"
    run_in_process(data(part, 7))
    assert len(load_trials(part, "digits_m2n2_experts")) == 7
    from evomerge.experiment import Experiment

    run_experiment(Experiment.from_dict(data(part, 13)), resume=True, progress=False)
    want, got = (by_slot(load_trials(r, "digits_m2n2_experts")) for r in (whole, part))
    assert want.keys() == got.keys() and len(want) == 13
    for slot in want:
        np.testing.assert_array_equal(got[slot][0], want[slot][0])
        assert got[slot][1] == want[slot][1]


def _mid_child(counts: dict[str, int]) -> bool:
    """Some children told and one being evaluated: a kill now leaves its trial RUNNING."""
    return counts["COMPLETE"] >= 6 and counts["RUNNING"] >= 1


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume_asks_and_scores_what_an_uninterrupted_run_does(zoo,
                                                                                    tmp_path):
    """``evomerge run`` SIGKILLed while a child is being evaluated (its trial left RUNNING),
    then ``evomerge resume``: the interrupted trial is marked FAIL(interrupted) and never told,
    its slot is evaluated again, and the whole trajectory equals an uninterrupted run's (the
    trials' x and values, so the replayed archive made the same children)."""
    import signal

    from run_helpers import (
        by_slot,
        cli,
        experiment_data,
        is_interrupted,
        kill_group,
        load_trials,
        run_cli,
        run_in_process,
        start,
        state_counts,
        wait_until,
        write_experiment,
    )

    budget, name = 15, "digits_m2n2_experts"
    whole = tmp_path / "whole"
    run_in_process(experiment_data("m2n2_experts", zoo, whole, budget=budget))
    run_dir = tmp_path / "run"
    exp = write_experiment(tmp_path / "exp.yaml",
                           experiment_data("m2n2_experts", zoo, run_dir, budget=budget))
    proc = start(cli("run", exp), tmp_path / "run.log")
    try:
        wait_until(lambda: _mid_child(state_counts(run_dir)), timeout=90, proc=proc,
                   log=tmp_path / "run.log", what="a child being evaluated")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    landed = state_counts(run_dir)  # RUNNING 1 unless the child finished within the poll
    assert landed["RUNNING"] <= 1 and landed["COMPLETE"] < budget

    result = run_cli(cli("resume", run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(run_dir, name)
    interrupted = [t for t in trials if is_interrupted(t)]
    assert len(interrupted) == landed["RUNNING"]
    assert all(t.state.name == "FAIL" for t in interrupted)
    want, got = by_slot(load_trials(whole, name)), by_slot(trials)
    assert want.keys() == got.keys() and len(got) == budget
    for slot in want:
        np.testing.assert_array_equal(got[slot][0], want[slot][0])
        assert got[slot][1] == want[slot][1]

# ---- from scratch: compact record, resume by replay ---------------------------------------------


def test_reference_split_and_layout():
    (x, y), (xt, yt) = reference_digits()
    assert (len(x), len(xt)) == (1437, 360) and x.max() == 16  # unshuffled, raw pixels
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(yt, load_digits().target[1437:])
    # the flat layout against a naive forward: W1 row-major [64, 256], b1, W2 [256, 10], b2
    g = np.random.default_rng(0).standard_normal(FlatDigitsMLP.dim)
    w1, b1 = g[:16384].reshape(64, 256), g[16384:16640]
    w2, b2 = g[16640:19200].reshape(256, 10), g[19200:]
    want = (np.maximum(x[:50] @ w1 + b1, 0) @ w2 + b2).argmax(1) == y[:50]
    np.testing.assert_array_equal(FlatDigitsMLP(x[:50], y[:50])(g)[0], want)


def test_scratch_run_records_every_evaluation_compactly_and_resumes_by_replay(tmp_path):
    from evomerge.reproductions.scratch import run_scratch

    config = {"name": "s", "strategy": {"name": "m2n2", "popsize": 3}, "seed": 1,
              "record_every": 20}
    whole = run_scratch({**config, "budget": 61}, run_dir=tmp_path / "whole")
    # batches of 2 (the initial pair) then 3: trials hold 20, 21 and the last 20 evaluations
    assert whole["evaluations"] == 61 and whole["trials"] == 3
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from evomerge.reproductions.scratch import _stored

    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(tmp_path / "whole" / "study.log"))))
    stored = _stored(study)
    assert [r[0] for r, _ in stored] == list(range(61))
    assert all(len(s) == 1437 and set(np.unique(s)) <= {0.0, 1.0} for _, s in stored)
    run_scratch({**config, "budget": 40}, run_dir=tmp_path / "part")
    resumed = run_scratch({**config, "budget": 61}, run_dir=tmp_path / "part", resume=True)
    assert (resumed["replayed"], resumed["evaluations"]) == (40, 61)
    assert (resumed["train_acc"], resumed["test_acc"]) == (whole["train_acc"], whole["test_acc"])
    with pytest.raises(ValueError, match="resume it"):
        run_scratch({**config, "budget": 61}, run_dir=tmp_path / "part")
    with pytest.raises(ValueError, match="does not match the recomputed"):
        run_scratch({**config, "seed": 2, "budget": 70}, run_dir=tmp_path / "part",
                    resume=True)


def test_scratch_records_rebuild_the_children():
    """The record (step, parents, split, mix) plus the seed rebuild a child from its parents."""
    (x, y), _ = reference_digits()
    evaluate = FlatDigitsMLP(x[:200], y[:200])
    records: list[ChildRecord] = []
    niches = scratch_search(evaluate, evaluate.dim, 12, seed=3,
                            on_batch=lambda r, s: records.extend(r))
    assert [r.step for r in records] == list(range(12))
    genomes = {0: np.random.default_rng([3, 0]).standard_normal(evaluate.dim) * 0.01,
               1: np.random.default_rng([3, 1]).standard_normal(evaluate.dim) * 0.01}
    for r in records[2:]:
        rng = np.random.default_rng([3, r.step])
        rng.random(2)  # the two parent draws (Generator.choice with p takes one double each)
        assert (rng.integers(0, evaluate.dim), rng.random()) == (r.split, r.mix)
        noise = rng.standard_normal(evaluate.dim) * 0.01
        genomes[r.step] = slerp_split(genomes[r.parent_a], genomes[r.parent_b], r.split,
                                      r.mix) + noise
    for row, step in enumerate(niches.steps):
        if step >= 0:
            np.testing.assert_allclose(niches.genomes[row], genomes[step], rtol=0, atol=1e-12)


def test_scratch_cmaes_resumes_by_replay(tmp_path):
    from evomerge.reproductions.scratch import run_scratch

    config = {"name": "c", "strategy": {"name": "cmaes", "popsize": 10}, "seed": 1,
              "record_every": 10}
    whole = run_scratch({**config, "budget": 40}, run_dir=tmp_path / "whole")
    run_scratch({**config, "budget": 20}, run_dir=tmp_path / "part")
    resumed = run_scratch({**config, "budget": 40}, run_dir=tmp_path / "part", resume=True)
    assert resumed["replayed"] == 20
    assert (resumed["train_acc"], resumed["test_acc"]) == (whole["train_acc"], whole["test_acc"])


@pytest.mark.parametrize("config, message", [
    ({"name": "x", "strategy": {"name": "m2n2"}, "budget": 0}, "budget"),
    ({"name": "x", "strategy": {"name": "ga"}, "budget": 5}, "strategy"),
    ({"name": "x", "strategy": {"name": "m2n2", "sigma0": 1}, "budget": 5}, "sigma0"),
    ({"name": "x", "strategy": {"name": "m2n2"}, "budget": 5, "setting": "mnist"}, "setting"),
    ({"name": "x", "strategy": {"name": "m2n2"}, "budget": 5, "bugdet": 5}, "bugdet"),
    ({"name": "x", "strategy": {"name": "m2n2", "init": "zoo"}, "budget": 5}, "init"),
])
def test_scratch_config_errors_name_the_field(config, message):
    from evomerge.reproductions.scratch import check_config

    with pytest.raises(ValueError, match=message):
        check_config(config)
