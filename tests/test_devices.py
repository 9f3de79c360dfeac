"""Worker devices (issue 13 item 1): ``executor.device`` -> each worker's device, engine options,
and what a run records about where its trials ran.

The GPU choice is tested with a faked count of visible GPUs (this machine has none); the CPU
paths run for real, on the digits zoo.
"""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import build_zoo, experiment_data, run_in_process
from typer.testing import CliRunner

from evomerge.execution import local
from evomerge.execution.devices import DeviceError, describe, resolve_device
from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment, ExperimentError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.getbasetemp() / "digits-zoo")


# ---- the choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, slot, gpus, expected", [
    ("cpu", 0, 4, "cpu"),
    ("auto", 0, 0, "cpu"),            # no GPU: auto falls back
    ("auto", 0, 1, "cuda:0"),
    ("auto", 5, 2, "cuda:1"),         # 6 workers on 2 GPUs: round-robin
    ("cuda", 2, 3, "cuda:2"),
    ("cuda", 3, 3, "cuda:0"),
    ("cuda:1", 7, 2, "cuda:1"),       # pinned: every slot the same GPU
    (" CUDA:0 ", 0, 1, "cuda:0"),
])
def test_resolve_device(spec, slot, gpus, expected):
    assert resolve_device(spec, slot, gpus=gpus) == torch.device(expected)


def test_round_robin_spreads_workers_evenly():
    chosen = [resolve_device("auto", k, gpus=3).index for k in range(7)]
    assert chosen == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("spec, gpus, words", [
    ("cuda", 0, "asked for a GPU"),
    ("cuda:0", 0, "does not exist here"),
    ("cuda:2", 2, "2 visible GPU(s)"),
    ("tpu", 1, "expected auto, cpu, cuda or cuda:N"),
])
def test_unavailable_devices_fail_with_the_reason(spec, gpus, words):
    with pytest.raises(DeviceError, match="device:") as err:
        resolve_device(spec, 0, gpus=gpus)
    assert words in str(err.value)


def test_cpu_only_torch_is_named_as_the_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="CPU-only build"):
        resolve_device("cuda", 0, gpus=0)


def test_describe_a_cpu_worker():
    assert describe(torch.device("cpu"), torch.bfloat16) == {"device": "cpu",
                                                            "dtype": "bfloat16"}


# ---- the experiment --------------------------------------------------------------------------


def _data(zoo, tmp_path, **fields):
    data = experiment_data("cmaes", zoo, tmp_path / "run", budget=8)
    for key, value in fields.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def test_experiment_fields_are_validated_together(zoo, tmp_path):
    with pytest.raises(ExperimentError) as err:
        Experiment.from_dict(_data(zoo, tmp_path, executor={"device": "gpu"},
                                   engine={"cache": "lots", "chunk": 0},
                                   models={"dtype": "float64"}))
    message = str(err.value)
    for field in ("executor.device", "engine.cache", "engine.chunk", "models.dtype"):
        assert field in message, message


def test_ray_on_a_gpu_needs_gpus_per_worker(zoo, tmp_path):
    with pytest.raises(ExperimentError, match="gpus_per_worker"):
        Experiment.from_dict(_data(zoo, tmp_path, executor={"kind": "ray", "workers": 1,
                                                            "device": "cuda"}))


def test_defaults_are_auto(zoo, tmp_path):
    e = Experiment.from_dict(_data(zoo, tmp_path))
    assert (e.executor.device, e.models.dtype, e.engine.cache) == ("auto", "auto", "off")
    assert e.models.resolved().dtype == "auto"  # resolution keeps the dtype


def test_engine_options_reach_the_merger(zoo, tmp_path):
    from evomerge.execution.evaluator import evaluator_for

    e = Experiment.from_dict(_data(zoo, tmp_path, engine={"cache": "3MB", "chunk": 4096}))
    evaluator = evaluator_for(e.resolved())
    assert evaluator.merger.chunk == 4096
    assert evaluator.merger._cache_budget == 3 * 10**6
    assert evaluator.device == torch.device("cpu")  # auto without a GPU


def test_an_explicit_gpu_fails_before_any_model_loads(zoo, tmp_path, monkeypatch):
    from evomerge.execution import evaluator

    monkeypatch.setattr(evaluator, "Merger", lambda *a, **k: pytest.fail("loaded models"))
    e = Experiment.from_dict(_data(zoo, tmp_path, executor={"device": "cuda"}))
    with pytest.raises(DeviceError, match="asked for a GPU"):
        evaluator.evaluator_for(e.resolved())


# ---- local workers get slots; a replacement keeps its slot -----------------------------------


class _FakeProcess:
    def __init__(self, target, args, daemon):
        self.args, self.alive = args, True

    def start(self):
        pass

    def is_alive(self):
        return self.alive

    pid, exitcode = 12345, -9


class _FakeStore:
    def fail_interrupted(self, owner):
        return []


def test_local_workers_take_slots_and_replacements_keep_them(zoo, tmp_path, monkeypatch):
    class Context:
        Process = _FakeProcess

    monkeypatch.setattr(local.mp, "get_context", lambda kind: Context)
    e = Experiment.from_dict(_data(zoo, tmp_path, executor={"workers": 3})).resolved()
    executor = local.LocalExecutor(e, {})
    executor._start()
    assert [p.args[-1] for p in executor._procs] == [0, 1, 2]
    executor._procs[1].alive = False
    executor._replace_dead(_FakeStore())
    assert [p.args[-1] for p in executor._procs] == [0, 1, 2]
    assert executor._procs[1].alive  # a new process in slot 1


# ---- what a run records ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_summary_records_each_workers_device(zoo, tmp_path, workers):
    data = _data(zoo, tmp_path, executor={"workers": workers, "device": "auto"})
    summary = run_in_process(data)
    devices = summary["devices"]
    assert devices["driver"] == {"device": "cpu", "dtype": "float32"}
    workers_seen = devices["workers"]
    assert sum(w["trials"] for w in workers_seen.values()) == summary["n_trials"] == 8
    assert {(w["device"], w["dtype"]) for w in workers_seen.values()} == {("cpu", "float32")}
    if workers:
        # one worker may take every trial while the other still starts
        assert 1 <= len(workers_seen) <= 2 and "in-process" not in workers_seen
    else:
        assert list(workers_seen) == ["in-process"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["devices"] == devices


def test_merge_cli_refuses_a_missing_gpu(tmp_path):
    from evomerge.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: []\n")
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"),
                                      "--device", "cuda:3"])
    assert result.exit_code != 0
    assert "--device: 'cuda:3' does not exist here" in result.output


# ---- dtype end to end ------------------------------------------------------------------------


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("copy a b c = a b c\nreverse a b = b a\nsort c a b = a b c\n"
                    "copy x y = x y\nreverse 1 2 3 = 3 2 1\n")
    return path


def _bf16_experiment(tmp_path, **models):
    from arch_models import make_family

    paths = make_family("llama", tmp_path / "family", n_models=3, seed=0, dtype=torch.bfloat16)
    return Experiment.from_dict({
        "name": "bf16", "models": {"base": str(paths[0]), "sources": {
            f"s{k}": str(p) for k, p in enumerate(paths[1:])}, **models},
        "space": "task_arithmetic_per_source",
        "fitness": {"name": "perplexity", "data": str(_text(tmp_path))},
        "strategy": {"name": "random", "popsize": 2}, "budget": 2,
        "run_dir": str(tmp_path / "run")}).resolved()


def test_bf16_checkpoints_evaluate_in_bf16_and_a_float32_override_scores_the_same_merge(tmp_path):
    from evomerge.execution.evaluator import evaluator_for
    from evomerge.recipe import MergeRecipe

    auto = evaluator_for(_bf16_experiment(tmp_path))
    wide = evaluator_for(_bf16_experiment(tmp_path, dtype="float32"))
    assert auto.placement == {"device": "cpu", "dtype": "bfloat16"}
    assert wide.placement == {"device": "cpu", "dtype": "float32"}
    assert auto.inner.new_model().dtype == torch.bfloat16  # the fitness got the dtype too
    paths = auto.merger.paths
    recipe = MergeRecipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 0.7}} for p in paths[1:]]})
    narrow = auto.build(recipe).state_dict()
    for name, tensor in wide.build(recipe).state_dict().items():
        assert tensor.dtype == torch.float32
        # float32 evaluation of the very merge a bf16 export writes: the bf16 result, widened
        assert torch.equal(tensor, narrow[name].float()), name


@pytest.mark.slow
def test_a_bf16_run_exports_bf16_and_records_its_dtype(tmp_path):
    from evomerge.merge.checkpoints import inspect_model

    summary = run_experiment(_bf16_experiment(tmp_path), progress=False)
    assert summary["n_failed"] == 0
    assert summary["devices"]["workers"]["in-process"] == {"device": "cpu", "dtype": "bfloat16",
                                                           "trials": 2}
    exported = inspect_model(tmp_path / "run" / "best_model")
    assert {m.dtype for m in exported.tensors.values()} == {"BF16"}
