"""Shared fixtures-in-code for the merge tests: tiny Llama families saved as HF directories.

A *family* is one randomly initialised base plus sources that are the base plus small, different
random perturbations, so every source has a meaningful task vector (``source - base``) of about
``scale`` per entry, as fine-tunes of one base do.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers


def llama_config(hidden: int = 32, intermediate: int = 64, layers: int = 3) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Family:
    """Absolute paths of a saved base and its sources."""

    base: Path
    sources: tuple[Path, ...]

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.base, *self.sources)


def make_family(
    root: Path,
    *,
    n_sources: int = 3,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 3,
    seed: int = 0,
    scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> Family:
    """Save ``root/base`` and ``root/s{i}`` (safetensors) and return their absolute paths.

    ``dtype`` is what the checkpoints hold (config.json says so too); weights are drawn in
    float32 and rounded once to it, so a float32 family is the same whatever the default.
    """
    root = Path(root).absolute()
    config = llama_config(hidden, intermediate, layers)
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config).eval()

    def save(path: Path) -> None:
        (base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)).save_pretrained(path)

    save(root / "base")
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    sources = []
    for i in range(n_sources):
        gen = torch.Generator().manual_seed(1000 * seed + 17 + i)
        with torch.no_grad():
            for name, param in base.state_dict().items():
                param.copy_(state[name] + scale * torch.randn(param.shape, generator=gen))
        save(root / f"s{i}")
        sources.append(root / f"s{i}")
    return Family(root / "base", tuple(sources))


def cast_model(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of the model directory ``src`` at ``dst`` whose floating-point weights are stored
    in ``dtype`` (rounded once) and whose config.json says so; other files are copied as they
    are. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for file in sorted(src.glob("*.safetensors")):
        state = safetensors.torch.load_file(file)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        safetensors.torch.save_file(state, dst / file.name, metadata={"format": "pt"})
    config_file = dst / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2))
    return dst


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory (all ``*.safetensors`` shards)."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    for file in files:
        part = safetensors.torch.load_file(file)
        assert not state.keys() & part.keys(), f"{file}: tensor in two shards"
        state.update(part)
    return state
