"""Specification of evomerge.merge.checkpoints and evomerge.merge.export: local checkpoint
inspection, safe loading, compatibility checks and atomic export, checked against real (tiny)
transformers models."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from evomerge.merge import checkpoints, export
from evomerge.merge.checkpoints import CheckpointError, IncompatibleModelsError, TensorMeta

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 61, 4, 3]])
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tiny_llama(seed: int, *, tied: bool) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(60)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _save(model: torch.nn.Module, path: Path, *, tokenizer: bool = True) -> Path:
    model.save_pretrained(path)
    if tokenizer:
        _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    """An untied tiny Llama saved with a tokenizer and chat template, plus the live model."""
    model = _tiny_llama(0, tied=False)
    return _save(model, tmp_path_factory.mktemp("base") / "llama"), model


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
    model = _tiny_llama(1, tied=True)
    return _save(model, tmp_path_factory.mktemp("tied") / "llama-tied"), model


def _logits(model_dir: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits


def _reference_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def _safe_keys(file: Path) -> list[str]:
    with safetensors.safe_open(file, framework="pt") as f:
        return list(f.keys())


def _leftovers(out_dir: Path) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.*"))


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# ------------------------------------------------------------------ finding and inspecting


def test_inspect_model_reports_every_tensor_shape_and_dtype_from_headers(base):
    path, model = base
    info = checkpoints.inspect_model(path)
    truth = {k: TensorMeta(tuple(v.shape), "F32") for k, v in model.state_dict().items()}
    assert info.tensors == truth
    assert info.architecture == "LlamaForCausalLM"
    assert info.config == json.loads((path / "config.json").read_text())
    assert info.path == path


def test_weight_files_prefers_safetensors_over_pickles(base, tmp_path):
    path, model = base
    shutil.copytree(path, tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    assert checkpoints.weight_files(tmp_path / "m") == [tmp_path / "m" / "model.safetensors"]


def test_weight_files_without_weights_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        checkpoints.weight_files(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoints.weight_files(tmp_path / "absent")


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    index = {"weight_map": {"w": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        checkpoints.weight_files(tmp_path)


def test_index_naming_a_missing_shard_names_that_shard(tmp_path):
    index = {"weight_map": {"w": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        checkpoints.load_state_dict(tmp_path)


def test_truncated_safetensors_file_is_a_checkpoint_error_naming_it(base, tmp_path):
    data = (base[0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoints.inspect_model(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoints.load_state_dict(tmp_path)


# ------------------------------------------------------------------ export round trips


def test_export_round_trip_gives_bit_identical_logits_and_a_working_tokenizer(base, tmp_path):
    path, model = base
    state = checkpoints.load_state_dict(path)
    out = export.export_model(state, tmp_path / "merged", base_dir=path, recipe_yaml="method: linear")
    assert torch.equal(_logits(out), _reference_logits(model))

    original = transformers.AutoTokenizer.from_pretrained(path)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    text = "w1 w7 w59 unknown"
    assert exported(text)["input_ids"] == original(text)["input_ids"] == [5, 11, 63, 0]
    chat = [{"role": "user", "content": "w3"}]
    assert exported.apply_chat_template(chat, tokenize=False) == "<user>w3"
    assert (out / "recipe.yaml").read_text() == "method: linear\n"
    assert (out / "generation_config.json").read_bytes() == (
        path / "generation_config.json"
    ).read_bytes()
    assert _leftovers(out) == []


def test_sharded_export_keeps_every_file_under_the_limit_and_maps_each_tensor_once(base, tmp_path):
    path, model = base
    limit = 20_000
    state = checkpoints.load_state_dict(path)
    out = export.export_model(state, tmp_path / "sharded", base_dir=path, max_shard_size="20KB")

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: list[str] = []
    for shard in shards:
        keys = _safe_keys(shard)
        assert shard.stat().st_size <= limit or len(keys) == 1, shard.name
        assert all(index["weight_map"][k] == shard.name for k in keys)
        seen += keys
    assert sorted(seen) == sorted(state) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())

    _assert_same_tensors(checkpoints.load_state_dict(out), model.state_dict())
    assert torch.equal(_logits(out), _reference_logits(model))


def test_tensor_larger_than_the_shard_limit_gets_a_shard_of_its_own(base, tmp_path):
    path, _ = base
    state = checkpoints.load_state_dict(path)
    out = export.export_model(state, tmp_path / "small", max_shard_size=5000)
    big = {n for n, t in state.items() if t.numel() * 4 > 5000}
    for shard in out.glob("*.safetensors"):
        keys = _safe_keys(shard)
        if big & set(keys):
            assert len(keys) == 1
        else:
            assert shard.stat().st_size <= 5000
    _assert_same_tensors(checkpoints.load_state_dict(out), state)


def test_tied_weights_are_written_once_under_the_base_checkpoint_name(tied, tmp_path):
    path, model = tied
    state = model.state_dict()  # lm_head.weight and embed_tokens.weight share storage here
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    # Put the alias first, so "keep the first name" would pick the one the base does not store.
    state = {"lm_head.weight": state["lm_head.weight"], **state}
    base_names = set(_safe_keys(path / "model.safetensors"))

    out = export.export_model(state, tmp_path / "tied", base_dir=path)
    assert set(_safe_keys(out / "model.safetensors")) == base_names
    assert torch.equal(_logits(out), _reference_logits(model))


def test_tied_weights_without_a_base_are_cloned_so_no_name_is_lost(tied, tmp_path):
    _, model = tied
    state = model.state_dict()
    out = export.export_model(state, tmp_path / "raw")
    loaded = checkpoints.load_state_dict(out)
    _assert_same_tensors(loaded, dict(state))


def test_export_dtype_casts_floats_and_makes_config_say_so(base, tmp_path):
    path, model = base
    out = export.export_model(
        checkpoints.load_state_dict(path), tmp_path / "bf16", base_dir=path, dtype=torch.bfloat16
    )
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert {m.dtype for m in checkpoints.inspect_model(out).tensors.values()} == {"BF16"}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_export_updates_the_legacy_torch_dtype_key_without_adding_a_new_one(base, tmp_path):
    path, _ = base
    legacy = shutil.copytree(path, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (legacy / "config.json").write_text(json.dumps(config))
    out = export.export_model(
        checkpoints.load_state_dict(legacy), tmp_path / "out", base_dir=legacy, dtype=torch.float16
    )
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "float16" and "dtype" not in written


def test_max_shard_size_strings_parse_like_hugging_face():
    assert export.parse_size("500MB") == 500_000_000
    assert export.parse_size("2GB") == 2_000_000_000
    assert export.parse_size("20KB") == 20_000
    assert export.parse_size("1GiB") == 2**30
    assert export.parse_size(1234) == 1234
    for bad in ("lots", "-1GB", 0, "5 parsecs"):
        with pytest.raises(ValueError, match="max_shard_size"):
            export.parse_size(bad)


# ------------------------------------------------------------------ pickle checkpoints


def test_bin_checkpoint_loads_with_weights_only_and_warns(base, tmp_path, caplog):
    path, model = base
    shutil.copy(path / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="evomerge.merge.checkpoints"):
        state = checkpoints.load_state_dict(tmp_path)
    assert "weights_only=True" in caplog.text and "pytorch_model.bin" in caplog.text
    _assert_same_tensors(state, model.state_dict())
    assert checkpoints.inspect_model(tmp_path).tensors == checkpoints.inspect_model(path).tensors


def test_sharded_bin_checkpoint_loads_every_shard(base, tmp_path):
    _, model = base
    state = model.state_dict()
    names = list(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[:10],
        "pytorch_model-00002-of-00002.bin": names[10:],
    }
    weight_map = {}
    for fname, part in halves.items():
        torch.save({n: state[n] for n in part}, tmp_path / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_tensors(checkpoints.load_state_dict(tmp_path), state)


class _RunsCode:
    """Unpickling this would run a shell command: what weights_only exists to stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_checkpoint_holding_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        checkpoints.load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        checkpoints.inspect_model(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------ compatibility


def _variant(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    """A copy of ``src`` whose state dict / config were changed by the given callables."""
    dst.mkdir()
    state = safetensors.torch.load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if tensors:
        tensors(state)
    if config:
        config(cfg)
    safetensors.torch.save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_check_compatible_reports_every_problem_of_every_model_at_once_without_loading(
    base, tmp_path, monkeypatch
):
    path, _ = base
    up = "model.layers.0.mlp.up_proj.weight"
    v = "model.layers.1.self_attn.v_proj.weight"

    def reshape(state):
        state[up] = torch.zeros(65, 32)

    def drop(state):
        del state[v]

    def halve(state):
        state["model.norm.weight"] = state["model.norm.weight"].bfloat16()

    def rename(config):
        config["architectures"] = ["MistralForCausalLM"]

    reshaped = _variant(path, tmp_path / "reshaped", tensors=reshape)
    missing = _variant(path, tmp_path / "missing", tensors=drop)
    half = _variant(path, tmp_path / "half", tensors=halve)
    mistral = _variant(path, tmp_path / "mistral", config=rename)
    nowhere = tmp_path / "does-not-exist"
    empty = tmp_path / "empty"
    empty.mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("tensor data was loaded during a compatibility check")

    for module, name in [
        (safetensors.torch, "load_file"), (safetensors.torch, "load"), (safetensors, "safe_open"),
        (safetensors.torch, "safe_open"), (torch, "load"), (checkpoints, "load_state_dict"),
    ]:  # fmt: skip
        monkeypatch.setattr(module, name, no_loading)

    with pytest.raises(IncompatibleModelsError) as caught:
        checkpoints.check_compatible([path, reshaped, missing, half, mistral, nowhere, empty])
    message = str(caught.value)
    problems = caught.value.problems
    assert len(problems) == 6
    assert message.count("\n") == 6  # a heading, then one line per problem
    for needle in [
        f"{reshaped}: tensor '{up}' has shape (65, 32), expected (64, 32)",
        f"{missing}: missing tensor(s) present in {path}: {v}",
        f"{half}: tensor 'model.norm.weight' has dtype BF16, expected F32",
        f"{mistral}: architecture 'MistralForCausalLM' differs from 'LlamaForCausalLM'",
        f"{nowhere}: no such file or directory",
        f"{empty}: no weights found",
    ]:
        assert needle in message
        assert sum(needle in p for p in problems) == 1


def test_check_compatible_returns_infos_of_matching_models_in_order(base, tmp_path):
    path, model = base
    twin = _save(_tiny_llama(7, tied=False), tmp_path / "twin", tokenizer=False)
    infos = checkpoints.check_compatible([path, str(twin)])
    assert [i.path for i in infos] == [path, twin]
    assert infos[0].tensors == infos[1].tensors
    assert set(infos[1].tensors) == set(model.state_dict())


def test_incompatible_models_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(IncompatibleModelsError(["a: x", "b: y"])))
    assert err.problems == ["a: x", "b: y"] and "b: y" in str(err)


# ------------------------------------------------------------------ atomic export

_SLOW_EXPORT = """
import sys, time
import safetensors.torch
from evomerge.merge import checkpoints, export

real_save = safetensors.torch.save_file
def save_then_stall(*args, **kwargs):
    real_save(*args, **kwargs)
    time.sleep(120)
safetensors.torch.save_file = save_then_stall
export.export_model(checkpoints.load_state_dict(sys.argv[1]), sys.argv[2], max_shard_size="20KB")
"""


def _start_stalled_export(src: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """Run an export in a child that stalls after its first shard; returns it and its temp dir."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, str(src), str(out)], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        first = list(out.parent.glob(f".{out.name}.tmp-*/model-00001-of-*.safetensors"))
        if first:
            return child, first[0].parent
        assert child.poll() is None, "the export child exited early"
        time.sleep(0.05)
    child.kill()
    child.wait()
    pytest.fail("the export child never wrote its first shard")


@pytest.mark.slow
def test_killed_export_leaves_no_out_dir_and_the_next_export_cleans_up(base, tmp_path):
    path, model = base
    out = tmp_path / "merged"
    child, tmp = _start_stalled_export(path, out)
    child.send_signal(signal.SIGKILL)
    child.wait()

    assert not out.exists()
    assert tmp.exists()  # only the hidden temp dir is left behind

    export.export_model(checkpoints.load_state_dict(path), out, base_dir=path)
    assert not tmp.exists()
    assert _leftovers(out) == []
    assert torch.equal(_logits(out), _reference_logits(model))


def test_temp_dir_of_a_running_export_to_the_same_dir_is_not_treated_as_stale(base, tmp_path):
    path, model = base
    out = tmp_path / "merged"
    child, tmp = _start_stalled_export(path, out)
    try:
        export.export_model(model.state_dict(), out)
        assert tmp.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_exception_mid_export_leaves_neither_out_dir_nor_temp_dir(base, tmp_path, monkeypatch):
    path, _ = base
    real_save = safetensors.torch.save_file
    calls = []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second_shard)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="disk full"):
        export.export_model(checkpoints.load_state_dict(path), out, base_dir=path, max_shard_size="20KB")
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused_without_overwrite_and_left_untouched(base, tmp_path):
    path, _ = base
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        export.export_model(checkpoints.load_state_dict(path), out, base_dir=path)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert _leftovers(out) == []


def test_overwrite_replaces_an_existing_dir_completely(base, tied, tmp_path):
    path, model = base
    out = export.export_model(tied[1].state_dict(), tmp_path / "merged", base_dir=tied[0])
    (out / "stray.txt").write_text("from the old export")

    state = checkpoints.load_state_dict(path)
    export.export_model(state, out, base_dir=path, overwrite=True, max_shard_size="20KB")
    assert not (out / "stray.txt").exists()
    assert not (out / "model.safetensors").exists()  # the old single shard is gone too
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(_logits(out), _reference_logits(model))
    assert _leftovers(out) == []


def test_progress_bar_does_not_change_the_output(base, tmp_path):
    path, _ = base
    state = checkpoints.load_state_dict(path)
    plain = export.export_model(state, tmp_path / "plain")
    shown = export.export_model(state, tmp_path / "shown", progress=True)
    assert (plain / "model.safetensors").read_bytes() == (shown / "model.safetensors").read_bytes()


# ------------------------------------------------------------------ permissions


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)) or ".": p.stat().st_mode & 0o777
            for p in [root, *root.rglob("*")]}


def test_export_gives_every_file_and_directory_ordinary_permissions(base, tmp_path, umask):
    """0644 / 0755 minus the umask: not the 0600 safetensors writes and mkdtemp's 0700, nor a
    sidecar's own restrictive mode, for shards, index, config, recipe and copied sidecars."""
    path, _ = base
    src = shutil.copytree(path, tmp_path / "src")
    templates = src / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool.jinja").write_text(CHAT_TEMPLATE)
    (templates / "tool.jinja").chmod(0o600)
    templates.chmod(0o700)
    (src / "tokenizer_config.json").chmod(0o600)
    out = export.export_model(checkpoints.load_state_dict(src), tmp_path / "pub" / "merged", base_dir=src,
                          recipe_yaml="merge_method: linear\n", max_shard_size="20KB")
    modes = _modes(out)
    dirs = {".", "additional_chat_templates"}
    assert {"model.safetensors.index.json", "config.json", "recipe.yaml", "tokenizer.json",
            "tokenizer_config.json", "additional_chat_templates/tool.jinja"} <= set(modes)
    assert sum(name.endswith(".safetensors") for name in modes) > 1
    want = {name: (0o777 if name in dirs else 0o666) & ~umask for name in modes}
    assert modes == want, {n: oct(m) for n, m in modes.items() if m != want[n]}
    # the parent export_model created, and an overwrite, follow the same rule
    assert (out.parent.stat().st_mode & 0o777) == 0o777 & ~umask
    export.export_model(checkpoints.load_state_dict(src), out, overwrite=True)
    assert _modes(out) == {".": 0o777 & ~umask, "model.safetensors": 0o666 & ~umask}
    assert _leftovers(out) == []


def test_umask_is_read_without_changing_it(umask):
    assert export._umask() == umask
    assert os.umask(umask) == umask


# ------------------------------------------------------------------ which dtype an export writes


def test_export_dtype_prefers_out_dtype_then_dtype_then_the_sources(base, tmp_path):
    path, model = base
    half = export.export_model(model.state_dict(), tmp_path / "bf16", base_dir=path,
                           dtype=torch.bfloat16)
    assert export.export_dtype("float16", "float32", sources=[half]) == torch.float16
    assert export.export_dtype(None, "float32", sources=[half]) == torch.float32
    assert export.export_dtype(None, torch.float16, sources=[half]) == torch.float16
    assert export.export_dtype(None, None, sources=[half]) == torch.bfloat16
    assert export.export_dtype(None, None, sources=[half, half]) == torch.bfloat16
    assert export.export_dtype(None, None, sources=[path]) == torch.float32
    # sources that disagree (the recipe then casts them): write the tensors as they are
    assert export.export_dtype(None, None, sources=[path, half]) is None
    assert export.export_dtype(sources=[]) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        export.export_dtype("bfloat17")
