"""Tiny random checkpoints of the decoder families evomerge merges, saved as real HF directories.

``make_family(family, root)`` writes a base and sources (the base plus small, different random
perturbations, as fine-tunes of one base are) with ``save_pretrained`` in bf16, each with the toy
zoo's word-level tokenizer (``0-9a-z``, ``copy reverse sort =`` and four special tokens; the
config's ``vocab_size`` is the tokenizer's), so every fitness that loads a tokenizer from the base
works on them. Deterministic per ``seed``; a few layers, hidden size 32-64: a family saves in well
under a second.

Families (``FAMILIES``): ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``phi3``
(fused ``qkv_proj`` / ``gate_up_proj``), ``gpt2`` (``Conv1D``, learned positions, tied head),
``gpt_neox`` (stored as Pythia checkpoints are: the head as ``embed_out.weight``, which is
also what transformers 5's ``save_pretrained`` writes although the class calls it ``lm_head``,
and per-layer ``attention.bias`` / ``masked_bias`` / ``rotary_emb.inv_freq`` buffers that the
class no longer keeps), ``gpt_neox_lm_head`` (the same model with the head stored as
``lm_head.weight``, the class's name, and no old buffers: mergekit cannot read it), ``olmo2``
and ``tied`` (a Llama with tied input and output embeddings, as Llama-3.2-1B and Qwen2.5-0.5B
are: no ``lm_head.weight`` in the checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import transformers

__all__ = ["FAMILIES", "MERGEKIT_FAMILIES", "config_for", "make_family", "tokenizer"]

LAYERS = 3  # a gradient over layers then reads t = 0, 0.5, 1
HIDDEN = 32
INTERMEDIATE = 64
HEADS = 4
KV_HEADS = 2
SCALE = 0.01  # per-entry size of a source's perturbation (a "task vector")


def tokenizer():
    """The toy zoo's word-level tokenizer (44 tokens), allowing 64-token inputs."""
    from evomerge.zoo.toy import make_tokenizer

    tok = make_tokenizer()
    tok.model_max_length = 64
    return tok


def _special(tok) -> dict[str, int]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def _decoder(cls: type, **extra) -> Callable[[int, dict], transformers.PretrainedConfig]:
    """Config maker of a Llama-style decoder class (hidden_size, num_hidden_layers, ...)."""

    def make(vocab: int, special: dict) -> transformers.PretrainedConfig:
        kwargs = {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
                  "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                  "num_key_value_heads": KV_HEADS, "max_position_embeddings": 128,
                  "tie_word_embeddings": False, **special}
        kwargs.update(extra)
        return cls(**kwargs)

    return make


def _gpt2(vocab: int, special: dict) -> transformers.PretrainedConfig:
    return transformers.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_inner=INTERMEDIATE,
                                   n_layer=LAYERS, n_head=HEADS, n_positions=128, **special)


def _gpt_neox(vocab: int, special: dict) -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
        rotary_pct=0.25, tie_word_embeddings=False, **special)


_CONFIGS: dict[str, Callable[[int, dict], transformers.PretrainedConfig]] = {
    "llama": _decoder(transformers.LlamaConfig),
    "mistral": _decoder(transformers.MistralConfig, sliding_window=None),
    "qwen2": _decoder(transformers.Qwen2Config),
    "qwen3": _decoder(transformers.Qwen3Config, head_dim=HIDDEN // HEADS),
    "gemma2": _decoder(transformers.Gemma2Config, head_dim=HIDDEN // HEADS, sliding_window=16),
    "phi3": _decoder(transformers.Phi3Config),
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "gpt_neox_lm_head": _gpt_neox,
    "olmo2": _decoder(transformers.Olmo2Config),
    "tied": _decoder(transformers.LlamaConfig, tie_word_embeddings=True),
}

#: every family make_family writes
FAMILIES: tuple[str, ...] = tuple(_CONFIGS)

#: the families mergekit (as installed) merges: its gpt-neox definition wants Pythia's names
MERGEKIT_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f != "gpt_neox_lm_head")

#: checkpoint-name changes applied after ``save_pretrained`` (regex-free: old prefix -> new)
_RENAME: dict[str, dict[str, str]] = {
    "gpt_neox": {"lm_head.": "embed_out."},  # in case a transformers version saves lm_head
    "gpt_neox_lm_head": {"embed_out.": "lm_head."},
}


def _pythia_buffers(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The per-layer buffers Pythia checkpoints store (saved by transformers 4 when they were
    persistent; transformers 5 ignores them on load, mergekit's gpt-neox definition needs them):
    the causal mask ``attention.bias`` (bool), ``attention.masked_bias`` and the rotary
    ``attention.rotary_emb.inv_freq`` (the model's own, now one buffer for all layers)."""
    config = model.config
    positions = config.max_position_embeddings
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions,
                                                                               positions)
    inv_freq = dict(model.named_buffers())["gpt_neox.rotary_emb.inv_freq"]
    out = {}
    for i in range(config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{i}.attention."
        out[prefix + "bias"] = mask.clone()
        out[prefix + "masked_bias"] = torch.tensor(-1e9).to(dtype)
        out[prefix + "rotary_emb.inv_freq"] = inv_freq.to(dtype).clone()
    return out


#: tensors added to every checkpoint of a family after ``save_pretrained``
_EXTRA: dict[str, Callable[[torch.nn.Module, torch.dtype], dict]] = {
    "gpt_neox": _pythia_buffers,
}


def config_for(family: str, vocab_size: int | None = None) -> transformers.PretrainedConfig:
    """The (tiny) config of ``family``; its vocabulary is the tokenizer's unless given."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    tok = tokenizer()
    return _CONFIGS[family](vocab_size or len(tok), _special(tok))


def _rewrite(path: Path, prefixes: dict[str, str], extra: dict[str, torch.Tensor]) -> None:
    """Rename the tensors of the (single-file) checkpoint in ``path`` whose names start with a
    key of ``prefixes``, and add ``extra``."""
    def new(name: str) -> str:
        for old, repl in prefixes.items():
            if name.startswith(old):
                return repl + name[len(old):]
        return name

    file = path / "model.safetensors"
    assert not (path / "model.safetensors.index.json").exists(), "tiny models save one file"
    state = {new(k): v for k, v in safetensors.torch.load_file(file).items()}
    safetensors.torch.save_file({**state, **extra}, file, metadata={"format": "pt"})


def make_family(family: str, root: str | Path, n_models: int = 3, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16, scale: float = SCALE) -> list[Path]:
    """Save ``root/base`` and ``root/s0 .. s{n_models-2}`` of ``family`` and return their
    absolute paths, base first.

    Weights are drawn in float32 (seeded: the same family for the same ``seed`` whatever torch's
    default dtype), perturbed per source, and rounded once to ``dtype``, which config.json then
    names. Every directory holds the tokenizer, so each loads with ``AutoTokenizer`` and
    ``AutoModelForCausalLM.from_pretrained`` and mergekit reads it.
    """
    if n_models < 1:
        raise ValueError("n_models: at least the base")
    root = Path(root).absolute()
    tok = tokenizer()
    config = config_for(family, len(tok))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # norms and biases off their constant init, so that no merge of them is trivially the base's
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))

    def save(path: Path) -> Path:
        copy.deepcopy(model).to(dtype).save_pretrained(path)
        tok.save_pretrained(path)
        if family in _RENAME or family in _EXTRA:
            extra = _EXTRA[family](model, dtype) if family in _EXTRA else {}
            _rewrite(path, _RENAME.get(family, {}), extra)
        return path

    paths = [save(root / "base")]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(n_models - 1):
        gen = torch.Generator().manual_seed(1000 * seed + 17 + i)
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if param.is_floating_point():
                    param.copy_(state[name] + scale * torch.randn(param.shape, generator=gen))
        paths.append(save(root / f"s{i}"))
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(state[name])
    return paths
