"""Models by Hugging Face Hub id (``org/name[@revision]``), offline, against a cache laid out here.

The cache has huggingface_hub's real layout (``models--org--name/{blobs, refs/<branch or tag>,
snapshots/<sha>/<file -> ../../blobs/<hash>>}``) under ``tmp_path``; ``HF_HUB_OFFLINE`` is set
and every socket connection fails the test, so nothing here can reach the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge import hub
from evomerge.cli import app
from evomerge.execution.driver import run_experiment
from evomerge.experiment import Experiment, ExperimentError, Models

try:
    from helpers import load_weights, make_family
except ImportError:  # tests/ imported as a package
    from tests.helpers import load_weights, make_family

ORG = "evo-test"


def sha_of(repo_id: str, salt: str = "") -> str:
    return hashlib.sha1(f"{repo_id}{salt}".encode()).hexdigest()


def cache_model(cache: Path, repo_id: str, model_dir: Path, *, refs: tuple[str, ...] = ("main",),
                commit: str | None = None) -> Path:
    """Lay ``model_dir``'s files out as the snapshot ``commit`` of ``repo_id`` in the hub cache
    ``cache``, with each ref in ``refs`` pointing at it; returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = commit or sha_of(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(Path(model_dir).iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base (with a tokenizer) and two sources, as plain directories."""
    from evomerge.zoo.toy import make_tokenizer

    family = make_family(tmp_path_factory.mktemp("hub") / "family", n_sources=2)
    make_tokenizer().save_pretrained(family.base)
    return family


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from evomerge.zoo.digits import build_digits_zoo

    return build_digits_zoo(tmp_path_factory.mktemp("digits"), seed=0, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, family, digits) -> Path:
    """The hub cache: tiny-base (refs main and v1), tiny-s0, tiny-s1, and the digits zoo."""
    root = tmp_path_factory.mktemp("hf").resolve() / "hub"
    cache_model(root, f"{ORG}/tiny-base", family.base, refs=("main", "v1"))
    for i, source in enumerate(family.sources):
        cache_model(root, f"{ORG}/tiny-s{i}", source)
    for name in ("base", "expert_0_4", "expert_5_9"):
        cache_model(root, f"{ORG}/digits-{name}", digits[name])
    return root


@pytest.fixture
def offline(cache, tmp_path, monkeypatch) -> Path:
    """This process and its children read ``cache`` offline; a socket connection fails."""
    from huggingface_hub import constants

    for var, value in {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache),
                       "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(var, value)
    # huggingface_hub reads these at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access in an offline test: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.chdir(tmp_path)
    return cache


def snapshot(cache: Path, name: str) -> str:
    repo_id = f"{ORG}/{name}"
    return str(cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha_of(repo_id))


# ---- what is a Hub id ------------------------------------------------------------------------


@pytest.mark.parametrize("ref, expected", [
    ("org/name", ("org/name", None)),
    ("org/name@main", ("org/name", "main")),
    ("Org-1/Name_2.x@refs/pr/3", ("Org-1/Name_2.x", "refs/pr/3")),
    ("name", None),                      # no org: a path
    ("a/b/c", None),                     # two slashes: a path
    ("./org/name", None), ("/org/name", None), ("~/org/name", None), ("../org/name", None),
    ("org/name@", None), ("org--x/name", None), ("", None),
])  # fmt: skip
def test_parse(ref, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parsed = hub.parse(ref)
    assert (parsed and (parsed.repo_id, parsed.revision)) == (expected or None)
    assert hub.is_hub_id(ref) == (expected is not None)


def test_a_local_directory_that_looks_like_an_id_stays_a_path(offline, tmp_path, family):
    shutil.copytree(family.sources[0], tmp_path / ORG / "tiny-s0")
    assert not hub.is_hub_id(f"{ORG}/tiny-s0")  # the local copy wins over the cached model
    models = Models(sources={"a": f"{ORG}/tiny-s0"}).resolved()
    assert models.sources["a"] == str(tmp_path / ORG / "tiny-s0")
    assert models.hub_models() == {}
    # under an existing local directory, a missing model is a missing path, not a Hub id
    assert not hub.is_hub_id(f"{ORG}/not-there")
    assert Models(sources={"b": f"{ORG}/not-there"}).missing() == [
        f"models.sources.b: {ORG}/not-there is not a directory"]


# ---- resolving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "@main", "@v1", "@sha"])
def test_ids_resolve_to_the_snapshot(offline, suffix):
    repo_id = f"{ORG}/tiny-base"
    commit = sha_of(repo_id)
    ref = repo_id + (f"@{commit}" if suffix == "@sha" else suffix)
    resolved = hub.resolve(ref)
    assert resolved.path == snapshot(offline, "tiny-base")
    assert (resolved.repo_id, resolved.commit) == (repo_id, commit)
    assert resolved.revision == {"": "main", "@sha": commit}.get(suffix, suffix[1:])
    assert resolved.pinned == f"{repo_id}@{commit}"
    assert hub.problem(ref) is None
    assert hub.cached_model(resolved.path) == hub.CachedModel(repo_id, commit)


def test_cached_model_is_none_outside_a_cache(family):
    assert hub.cached_model(family.base) is None
    assert hub.cached_model("/x/models--a--b/snapshots/not-a-sha") is None


def test_unknown_ids_are_named_with_their_field_without_a_network_call(offline):
    models = Models(base=f"{ORG}/tiny-base",
                    sources={"math": "nobody/nothing", "code": f"{ORG}/tiny-s0@no-such-branch",
                             "ok": f"{ORG}/tiny-s1"})
    problems = models.missing()
    assert [p.split(":")[0] for p in problems] == ["models.sources.math", "models.sources.code"]
    assert "nobody/nothing" in problems[0] and "HF_HUB_OFFLINE" in problems[0]
    assert f"{ORG}/tiny-s0@no-such-branch" in problems[1]
    with pytest.raises(ExperimentError, match=r"models\.sources\.math: nobody/nothing"):
        models.resolved()
    with pytest.raises(hub.HubError, match="nobody/nothing"):
        hub.resolve("nobody/nothing")


def test_a_snapshot_without_safetensors_is_not_a_model(offline, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "pytorch_model.bin").write_bytes(b"pickle")
    cache_model(offline, f"{ORG}/pickles-only", bare)
    why = hub.problem(f"{ORG}/pickles-only")
    assert "no safetensors weights in its cached snapshot" in why and "HF_HUB_OFFLINE" in why
    with pytest.raises(hub.HubError, match=f"{ORG}/pickles-only"):
        hub.resolve(f"{ORG}/pickles-only")


def test_online_download_fetches_only_what_a_merge_reads(cache, monkeypatch):
    """Not offline, not cached: snapshot_download is asked for the merge's files alone."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, *, revision, allow_patterns, ignore_patterns,
                               local_files_only):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        repo_files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                      "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                      "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "chat_template.jinja", "pytorch_model.bin",
                      "training_args.pt", "model.Q4_K_M.gguf", "original/consolidated.00.pth",
                      "onnx/model.safetensors", "README.md", ".gitattributes"]
        kept = set(filter_repo_objects(repo_files, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns))
        assert kept == {"config.json", "generation_config.json",
                        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                        "model.safetensors.index.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                        "chat_template.jinja"}
        return snapshot(cache, "tiny-s0")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = hub.resolve("someone/remote-model@v2")
    assert calls == [True, False]
    assert resolved.path == snapshot(cache, "tiny-s0") and resolved.revision == "v2"


def test_online_check_asks_the_hub_for_metadata_only(cache, monkeypatch):
    """Not offline, not cached: problem() asks model_info (no download) and reports by id."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    class Sibling:
        def __init__(self, name):
            self.rfilename = name

    class FakeApi:
        def model_info(self, repo_id, revision=None):
            if repo_id == "someone/unreachable":
                raise ConnectionError("no route to host")
            files = {"someone/pickles": ["config.json", "pytorch_model.bin"],
                     "someone/fine": ["config.json", "model.safetensors"]}[repo_id]
            return type("Info", (), {"siblings": [Sibling(f) for f in files]})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", None)  # never downloads here
    monkeypatch.setattr(hub, "_cached", lambda hub_ref: None)
    assert hub.problem("someone/fine") is None
    assert "someone/pickles has no safetensors weights on the Hub" in hub.problem("someone/pickles")
    why = hub.problem("someone/unreachable@v1")
    assert why.startswith("someone/unreachable@v1") and "could not be reached" in why
    assert "ConnectionError: no route to host" in why


# ---- an experiment run and a merge, offline ---------------------------------------------------


def digits_experiment(tmp_path: Path) -> dict:
    commit = sha_of(f"{ORG}/digits-expert_5_9")
    return {
        "name": "hub",
        "models": {"base": f"{ORG}/digits-base",
                   "sources": {"expert_0_4": f"{ORG}/digits-expert_0_4@main",
                               "expert_5_9": f"{ORG}/digits-expert_5_9@{commit}"}},
        "space": {"method": "task_arithmetic",
                  "params": [{"name": "weight", "per": "source", "bounds": [0.0, 1.0]}]},
        "fitness": {"name": "digits"},
        "strategy": {"name": "random", "popsize": 2},
        "budget": 2,
        "run_dir": str(tmp_path / "run"),
        "export": False,
    }


def test_run_with_hub_models_records_their_commits(offline, tmp_path):
    from evomerge import report

    summary = run_experiment(Experiment.from_dict(digits_experiment(tmp_path)), progress=False)
    assert summary["n_trials"] == 2 and summary["n_failed"] == 0
    run = tmp_path / "run"
    recorded = yaml.safe_load((run / "experiment.yaml").read_text())["models"]
    assert recorded["base"] == snapshot(offline, "digits-base")
    assert recorded["sources"]["expert_5_9"] == snapshot(offline, "digits-expert_5_9")
    expected = {
        "models.base": ("digits-base", "main"),
        "models.sources.expert_0_4": ("digits-expert_0_4", "main"),
        "models.sources.expert_5_9": ("digits-expert_5_9", sha_of(f"{ORG}/digits-expert_5_9")),
    }

    def check(provenance: dict) -> None:
        assert set(provenance["hub_models"]) == set(expected)
        for field, (name, revision) in expected.items():
            assert provenance["hub_models"][field] == {
                "repo_id": f"{ORG}/{name}", "revision": revision,
                "commit": sha_of(f"{ORG}/{name}"), "path": snapshot(offline, name)}

    check(json.loads((run / "provenance.json").read_text()))
    # a resume reads the snapshot paths back: repo and commit from the paths, the revision
    # asked from the provenance the first start wrote
    again = Experiment.from_yaml(run / "experiment.yaml").resolved()
    assert again.models.hub_models()["models.base"]["revision"] is None
    report.write_provenance(run, again, resumed=True)
    provenance = json.loads((run / "provenance.json").read_text())
    check(provenance)
    assert [s["resumed"] for s in provenance["starts"]] == [False, True]


def test_run_with_an_unknown_hub_model_fails_before_compute(offline, tmp_path):
    data = digits_experiment(tmp_path)
    data["models"]["sources"]["expert_0_4"] = "nobody/nothing@main"
    data["models"]["base"] = str(tmp_path / "missing-base")
    with pytest.raises(ExperimentError) as info:
        run_experiment(Experiment.from_dict(data), progress=False)
    message = str(info.value)
    assert "models.base" in message and "missing-base" in message  # every problem at once
    assert "models.sources.expert_0_4: nobody/nothing@main" in message
    assert not (tmp_path / "run" / "study.db").exists()


def merge_config(base: str, sources: list[str]) -> dict:
    return {"merge_method": "ties", "base_model": base,
            "models": [{"model": s, "parameters": {"weight": 0.5, "density": 0.5}}
                       for s in sources],
            "dtype": "float32"}


def test_merge_cli_with_hub_ids_matches_the_local_merge(offline, family, tmp_path):
    base, s1 = f"{ORG}/tiny-base@v1", f"{ORG}/tiny-s1"
    hub_cfg = tmp_path / "hub.yaml"
    hub_cfg.write_text(yaml.safe_dump(merge_config(base, [f"{ORG}/tiny-s0", s1])))
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(yaml.safe_dump(merge_config(
        str(family.base), [str(s) for s in family.sources])))
    runner = CliRunner()
    for cfg, out in ((hub_cfg, "from-hub"), (local_cfg, "from-dirs")):
        result = runner.invoke(app, ["merge", str(cfg), "--out", out, "--device", "cpu"])
        assert result.exit_code == 0, result.output
    merged, expected = load_weights(tmp_path / "from-hub"), load_weights(tmp_path / "from-dirs")
    assert merged.keys() == expected.keys()
    assert all((merged[k] == expected[k]).all() for k in merged)
    assert (tmp_path / "from-hub" / "tokenizer.json").is_file()  # from the cached base
    written = yaml.safe_load((tmp_path / "from-hub" / "recipe.yaml").read_text())
    pinned = {name: f"{ORG}/{name}@{sha_of(f'{ORG}/{name}')}" for name in
              ("tiny-base", "tiny-s0", "tiny-s1")}
    assert written["base_model"] == pinned["tiny-base"]
    assert [m["model"] for m in written["models"]] == [pinned["tiny-s0"], pinned["tiny-s1"]]


def test_merge_cli_names_every_unknown_hub_id(offline, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(merge_config(
        f"{ORG}/tiny-base", [f"{ORG}/tiny-s0", "nobody/nothing", "nobody/else@v2"])))
    result = CliRunner().invoke(app, ["merge", str(cfg), "--out", "out", "--device", "cpu"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "models[1].model: nobody/nothing" in text and "models[2].model: nobody/else@v2" in text
    assert "models[0]" not in text
    assert not (tmp_path / "out").exists()


def test_merge_cli_layer_stack_from_hub_ids(offline, family, tmp_path):
    commit = sha_of(f"{ORG}/tiny-s0")
    cfg = tmp_path / "stack.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": f"{ORG}/tiny-base", "layer_range": [0, 2]}]},
        {"sources": [{"model": f"{ORG}/tiny-s0@{commit}", "layer_range": [1, 3]}]}]}))
    result = CliRunner().invoke(app, ["merge", str(cfg), "--out", "stack", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "stack" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    weights, s0 = load_weights(tmp_path / "stack"), load_weights(family.sources[0])
    name = "model.layers.{}.mlp.down_proj.weight"
    assert (weights[name.format(3)] == s0[name.format(2)]).all()
    written = yaml.safe_load((tmp_path / "stack" / "recipe.yaml").read_text())
    assert [s["sources"][0]["model"] for s in written["slices"]] == [
        f"{ORG}/tiny-base@{sha_of(f'{ORG}/tiny-base')}", f"{ORG}/tiny-s0@{commit}"]
