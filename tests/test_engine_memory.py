"""The engine's memory contract, tested: bounded scratch, small statistics, no source-sized
cache unless asked, streaming of layer groups when the inputs exceed the device budget.

The family is bf16 with tensors larger than the chunk, so every method runs the chunked paths
(exact rank selection from a sample, several random blocks, row chunks for DELLA).
"""

from __future__ import annotations

import pytest
import torch

import evomerge.merge.methods as methods
from evomerge.merge.checkpoints import load_state_dict
from evomerge.merge.engine import Merger
from evomerge.recipe import MergeRecipe

try:
    from helpers import make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import make_family

CHUNK = 2048
METHOD_PARAMS = {
    "task_arithmetic": {"weight": 0.7},
    "ties": {"weight": 1.0, "density": 0.4},
    "dare_ties": {"weight": 1.0, "density": 0.3},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "breadcrumbs": {"weight": 1.0, "density": 0.5, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.5, "gamma": 0.05},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """hidden 128, intermediate 256: 32k-element matrices, 16 chunks of 2048 each."""
    return make_family(tmp_path_factory.mktemp("bf16"), n_sources=3, hidden=128,
                       intermediate=256, layers=2, dtype=torch.bfloat16)


def recipe(method: str, family, seed: int = 0) -> MergeRecipe:
    models = [{"model": str(s), "parameters": METHOD_PARAMS.get(method, {})}
              for s in family.sources]
    return MergeRecipe.from_dict({"merge_method": method, "base_model": str(family.base),
                                  "models": models, "seed": seed})


def scratch_bound(n_sources: int, largest: int) -> int:
    """Chunk buffers (at most 24 slots, float32 work dtype for bf16) + one random block per
    source + the byte store of one tensor's random masks (MASK_STORE x chunk bytes)."""
    return (24 * CHUNK * 4 + n_sources * min(largest, methods.RNG_BLOCK) * 4
            + methods.MASK_STORE * CHUNK)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_scratch_stays_within_chunk_buffers_and_nothing_source_sized_is_kept(family, method,
                                                                            monkeypatch):
    # random blocks as small as a chunk, as 2^20 is next to a 2^20 chunk at real scale
    monkeypatch.setattr(methods, "RNG_BLOCK", CHUNK)
    merger = Merger(family.all, chunk=CHUNK)
    merger.build(recipe(method, family))
    memory = merger.memory()
    sizes = [t.numel() for t in load_state_dict(family.base).values()]
    assert memory["scratch"] <= scratch_bound(3, max(sizes))
    assert memory["scratch"] < memory["inputs"] / 8  # never proportional to the model
    assert memory["cache"] == 0
    # statistics: an L1 norm per (tensor, source) and, for tensors larger than a chunk, a sorted
    # float32 sample of max(4096, n / 256) |delta| values (1/64 of a bf16 source at real scale,
    # where tensors above a 2^20 chunk have n / 256 > 4096)
    sample = sum(min(n, max(4096, n // methods.SAMPLE_RATIO)) * 4 for n in sizes if n > CHUNK)
    assert memory["stats"] <= 3 * (sample + 8 * len(sizes))


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_builds_agree_across_chunk_sizes_cache_and_streaming(family, method):
    """The contract changes where bytes live, never the result: bit for bit."""
    r = recipe(method, family, seed=4)
    reference = Merger(family.all).build(r)
    variants = {
        "small chunks": Merger(family.all, chunk=CHUNK),
        "opt-in cache": Merger(family.all, chunk=CHUNK, cache="on"),
        "streamed": Merger(family.all, chunk=CHUNK, device_budget=1),
    }
    for label, merger in variants.items():
        for _ in range(2):  # first and steady builds alike
            got = merger.build(r)
            mismatched = [n for n in reference if not torch.equal(got[n], reference[n])]
            assert not mismatched, f"{label}: {mismatched[:3]}"


def test_streaming_keeps_inputs_in_host_memory_and_copies_one_group_ahead(family, monkeypatch):
    from evomerge.merge import engine

    merger = Merger(family.all, chunk=CHUNK, device_budget="1MB")
    assert merger.streaming
    copied: list[list[str]] = []
    original = engine._Streamer._copy

    def spy(self, names):
        copied.append(list(names))
        return original(self, names)

    monkeypatch.setattr(engine._Streamer, "_copy", spy)
    state = merger.build(recipe("ties", family))
    groups = merger.group_names
    assert len(copied) == len(groups)  # each layer group copied once per build, in order
    assert [merger.groups[names[0]].name for names in copied] == groups
    assert set(state) == set(merger.names)
    assert not Merger(family.all, device_budget="10GB").streaming
    assert not Merger(family.all).streaming  # CPU default: inputs stay memory-mapped


def test_opt_in_cache_makes_magnitude_thresholds_a_lookup(family, monkeypatch):
    merger = Merger(family.all, chunk=CHUNK, cache="on")
    r = recipe("ties", family)
    merger.build(r)
    passes = []
    monkeypatch.setattr(methods, "_bracket_pass",
                        lambda *a, **k: passes.append(1))  # would be a pass over the tensor
    merger.build(r)
    assert passes == []
    assert merger.memory()["cache"] > 0


def test_first_build_does_the_same_passes_as_every_build(family, monkeypatch):
    """No hidden warm-up: with the default (no cache) each build runs the same rank selections;
    only the small sorted samples are made once."""
    merger = Merger(family.all, chunk=CHUNK)
    r = recipe("ties", family)
    calls: list[int] = []
    original = methods._bracket_pass

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(methods, "_bracket_pass", counting)
    merger.build(r)
    first = len(calls)
    merger.build(r)
    assert first > 0 and len(calls) == 2 * first


def test_chunk_and_cache_options_are_checked(family):
    with pytest.raises(ValueError, match="chunk"):
        Merger(family.all, chunk=0)
    with pytest.raises(ValueError, match="cache"):
        Merger(family.all, cache="plenty")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "linear_like"])
def test_a_wider_target_receives_the_merge_rounded_to_the_checkpoints_dtype(family, method):
    """A float32 model over bf16 checkpoints (a fitness model) holds exactly the bf16 merge, so
    what a search evaluates is what it exports."""
    if method == "linear_like":
        r = MergeRecipe.from_dict({"merge_method": "linear", "models": [
            {"model": str(p), "parameters": {"weight": w}}
            for p, w in zip(family.all, (0.3, 0.3, 0.25, 0.15))]})
    else:
        r = recipe(method, family)
    merger = Merger(family.all, chunk=CHUNK)
    narrow = {n: t.clone() for n, t in merger.build(r).items()}
    wide = {n: torch.empty(t.shape, dtype=torch.float32) for n, t in narrow.items()}
    merger.build(r, into=wide)
    assert all(torch.equal(wide[n], narrow[n].float()) for n in narrow)
