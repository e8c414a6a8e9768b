"""Parity against transformers: tiny random checkpoints -> our real loader -> same logits/tokens.

The oracle is transformers' own implementation (float32, torch CPU). Each variant is loaded
twice: as saved by transformers 5 (``rope_parameters``) and rewritten to the transformers 4 keys
(``rope_theta`` + ``rope_scaling``), since both layouts are found in the wild.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from helpers import VARIANTS, hf_greedy, make_tiny_hf, to_transformers4_config
from mlxllm import load
from mlxllm.generation.step import generate_step

L_PROMPT, N_GREEDY = 16, 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (torch model, folder with the transformers-5 config, transformers-4 folder)."""
    out = {}
    for i, variant in enumerate(VARIANTS):
        root = tmp_path_factory.mktemp(variant)
        t5 = root / "t5"
        model = make_tiny_hf(variant, t5, seed=i)
        t4 = root / "t4"
        shutil.copytree(t5, t4)
        to_transformers4_config(t4, key="type" if i % 2 else "rope_type")
        out[variant] = (model, t5, t4)
    return out


def _prompt(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 49152, L_PROMPT).tolist()


@pytest.mark.parametrize("layout", ["t5", "t4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_match_transformers(checkpoints, variant, layout):
    hf_model, t5, t4 = checkpoints[variant]
    model, _ = load(t5 if layout == "t5" else t4, dtype=mx.float32)
    ids = _prompt(1)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    diff = np.abs(ours - ref)
    print(f"{variant}/{layout}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

    want = hf_greedy(hf_model, ids, N_GREEDY)
    got = list(generate_step(model, ids, model.make_cache(), max_tokens=N_GREEDY))
    assert got == want


@pytest.mark.parametrize("variant", ["llama", "qwen2-yarn"])
def test_rope_scaling_is_actually_exercised(checkpoints, variant):
    """Dropping rope_scaling must break parity, or the scaled tests above prove nothing."""
    import json

    hf_model, t5, _ = checkpoints[variant]
    cfg = json.loads((t5 / "config.json").read_text())
    theta = cfg["rope_parameters"]["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    plain = t5.parent / "plain"
    plain.mkdir(exist_ok=True)
    for f in t5.iterdir():
        shutil.copy(f, plain / f.name)
    (plain / "config.json").write_text(json.dumps(cfg))
    model, _ = load(plain, dtype=mx.float32)
    ids = _prompt(2) + _prompt(3) + _prompt(4)  # 48 positions, past the original context of 32
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(ours - ref).max() > 1e-2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_recompute(checkpoints, variant):
    _, t5, _ = checkpoints[variant]
    model, _ = load(t5, dtype=mx.float32)
    ids = _prompt(5) + _prompt(6)[:7]  # 23 tokens
    full = np.array(model(mx.array([ids]))[0])
    # prefill 9 tokens, then a chunk of 5, then one token at a time
    cache = model.make_cache()
    pieces = [model(mx.array([ids[:9]]), cache=cache), model(mx.array([ids[9:14]]), cache=cache)]
    pieces += [model(mx.array([[t]]), cache=cache) for t in ids[14:]]
    stepped = np.concatenate([np.array(p[0]) for p in pieces])
    assert cache[0].offset == len(ids)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
