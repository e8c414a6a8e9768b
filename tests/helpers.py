"""Shared test helpers: fixture lookup and tiny random Hugging Face checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def fixtures_root() -> Path:
    return Path(os.environ.get("MLXLLM_FIXTURES", "~/.cache/mlxllm-fixtures/models")).expanduser()


def fixture_model(name: str) -> Path:
    """Folder of a real fixture checkpoint; fails (never skips) when it has not been built."""
    folder = fixtures_root() / name
    if not (folder / "tokenizer.json").is_file():
        pytest.fail(
            f"fixture model {folder} is missing; build it with: bash ../shared/fixtures/"
            "make_real_models.sh ~/.cache/mlxllm-fixtures/venv ~/.cache/mlxllm-fixtures/models"
        )
    return folder


# Tiny configs: 2 layers, hidden 64, GQA ratio 2, the SmolLM2 vocabulary so that a real
# tokenizer (with a chat template) can sit next to the random weights.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

VARIANTS = {
    # llama3 scaling with a small original context so that it changes most frequencies
    "llama": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        tie_word_embeddings=False,
    ),
    "qwen2-tied": dict(
        model_type="qwen2",
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=True,
    ),
    "qwen2-untied": dict(
        model_type="qwen2",
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=False,
    ),
    # Qwen's documented 128K YaRN, scaled down so that positions pass the original context
    "qwen2-yarn": dict(
        model_type="qwen2",
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32
        ),
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3",
        head_dim=32,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=False,
        sliding_window=None,
    ),
}


def hf_config(variant: str):
    from transformers import AutoConfig

    kw = dict(TINY, **VARIANTS[variant])
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def make_tiny_hf(
    variant: str,
    out: Path,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    std: float = 0.1,
    tokenizer: bool = True,
):
    """Save a random float32 transformers model; returns the torch model (eval mode).

    ``tokenizer``: copy the SmolLM2 fixture's tokenizer files (or ``tokenizer_from``'s) beside
    the weights; not needed by ``load_model`` (the GPU machine has no fixtures)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32).eval()
    # random init has tiny weights; widen them so that logits are not all ~0 (parity tests);
    # quantization tests use a smaller std, closer to trained weights, so errors stay linear
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    model.save_pretrained(out, safe_serialization=True)
    if not tokenizer:
        return model
    src = tokenizer_from or fixture_model(SMOL)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return model


def to_transformers4_config(folder: Path, key: str = "type") -> dict:
    """Rewrite config.json the way transformers 4 wrote it: top-level rope_theta, rope_scaling."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    rope_type = params.get("rope_type", "default")
    cfg["rope_scaling"] = {key: rope_type, **scaling} if rope_type != "default" else None
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from a transformers model by full recompute (no cache: the plainest
    reference)."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def quantized_copy(model, bits: int = 4, group_size: int = 32):
    """A quantized copy of a built model (the same arrays, then quantized): the same
    vocabulary and close, not equal, predictions (a speculative draft)."""
    from mlxllm.quant import make_predicate, quantize_model

    q = type(model)(model.config)
    q.update(model.parameters())
    quantize_model(q, make_predicate(bits=bits, group_size=group_size))
    return q
