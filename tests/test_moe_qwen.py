"""Qwen2-MoE / Qwen3-MoE parity against transformers through our real loader.

Tiny random checkpoints (2 layers, hidden 64, GQA ratio 2, 8 experts top-2) saved with
``save_pretrained`` (which writes per-expert tensors, as the Hub checkpoints are) and loaded with
``mlxllm.loader.load_model``; the oracle is transformers' float32 torch implementation.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from helpers import hf_greedy
from mlxllm.generation.step import generate_step
from mlxllm.layers.moe import QuantizedSwitchLinear, SwitchGLU, softmax_topk
from mlxllm.loader import load_model
from mlxllm.quant import make_predicate, quantize_model

L_PROMPT, N_GREEDY, VOCAB = 16, 32, 512

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

VARIANTS = {
    # layer 0 dense (mlp_only_layers), layer 1 sparse with the sigmoid-gated shared expert
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        shared_expert_intermediate_size=96,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        norm_topk_prob=False,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
    # decoder_sparse_step=2: layer 0 dense, layer 1 sparse; YaRN with a small original context
    # so that the 48-token tests run past it
    "qwen2_moe-yarn-step2": dict(
        model_type="qwen2_moe",
        shared_expert_intermediate_size=96,
        decoder_sparse_step=2,
        norm_topk_prob=True,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16
        ),
    ),
    "qwen3_moe-yarn": dict(
        model_type="qwen3_moe",
        head_dim=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16
        ),
    ),
}


def _make_tiny(variant: str, out, seed: int, std: float = 0.1):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY, **VARIANTS[variant])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random init is tiny; widen it so logits are not ~0 and the router actually discriminates
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, variant in enumerate(VARIANTS):
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = (_make_tiny(variant, folder, seed=i), folder)
    return out


def _prompt(seed: int, n: int = L_PROMPT) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def test_checkpoint_has_per_expert_tensors_and_mixed_layers(checkpoints):
    """The fixture exercises stack_experts and both dense and sparse layers."""
    from safetensors import safe_open

    for variant, (_, folder) in checkpoints.items():
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            keys = set(f.keys())
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys, variant
        assert "model.layers.1.mlp.gate.weight" in keys, variant
        model = load_model(folder, dtype=mx.float32)
        sparse = [isinstance(b.mlp.get("experts"), SwitchGLU) for b in model.layers]
        if variant.startswith("qwen2_moe"):
            assert sparse == [False, True], variant
            assert "shared_expert" in model.layers[1].mlp
        else:
            assert sparse == [True, True], variant
            assert "shared_expert" not in model.layers[1].mlp


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_match_transformers(checkpoints, variant):
    hf_model, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    ids = _prompt(1)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    diff = np.abs(ours - ref)
    print(
        f"{variant}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, max |ref| "
        f"{np.abs(ref).max():.2f}"
    )
    assert np.abs(ref).max() > 1.0  # widened weights: logits far from 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

    want = hf_greedy(hf_model, ids, N_GREEDY)
    got = list(generate_step(model, ids, model.make_cache(), max_tokens=N_GREEDY))
    assert got == want
    assert len(set(want)) > 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_routing_is_exercised(checkpoints, variant):
    """Tokens of the prompt use several experts in the sparse layer, or parity proves little."""
    _, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    moe = model.layers[1].mlp
    h = model.model.embed_tokens(mx.array([_prompt(1)]))
    indices, _ = softmax_topk(moe.gate(h), moe.k, moe.norm_topk_prob)
    used = set(np.array(indices).flatten().tolist())
    print(f"{variant}: experts used {sorted(used)}")
    assert len(used) >= 4


@pytest.mark.parametrize("variant", ["qwen2_moe-yarn-step2", "qwen3_moe-yarn"])
def test_rope_scaling_is_honoured(checkpoints, variant, tmp_path):
    """48 positions (past original_max_position_embeddings=16) match; dropping YaRN breaks it."""
    hf_model, folder = checkpoints[variant]
    ids = _prompt(2) + _prompt(3) + _prompt(4)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(load_model(folder, dtype=mx.float32)(mx.array([ids]))[0])
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = np.array(load_model(tmp_path, dtype=mx.float32)(mx.array([ids]))[0])
    assert np.abs(plain - ref).max() > 1e-2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_recompute(checkpoints, variant):
    _, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    ids = _prompt(5) + _prompt(6) + _prompt(8)[:10]  # 42 tokens
    full = np.array(model(mx.array([ids]))[0])
    # prefill 33 tokens (66 token-expert pairs: the expert-sorted path), then a chunk of 5 and
    # single tokens (the unsorted path)
    cache = model.make_cache()
    pieces = [model(mx.array([ids[:33]]), cache=cache), model(mx.array([ids[33:38]]), cache=cache)]
    pieces += [model(mx.array([[t]]), cache=cache) for t in ids[38:]]
    stepped = np.concatenate([np.array(p[0]) for p in pieces])
    assert cache[0].offset == len(ids)
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe-yarn"])
def test_quantized_keeps_router_and_stays_close(checkpoints, variant):
    _, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    ids = _prompt(7, 40)  # 80 token-expert pairs: the sorted path
    ref = np.array(model(mx.array([ids]))[0])
    qconfig = quantize_model(model, make_predicate("uniform", 8, 32))
    assert qconfig["bits"] == 8
    moe = model.layers[1].mlp
    assert type(moe.gate).__name__ == "Linear"  # router in full precision
    assert isinstance(moe.experts.gate_proj, QuantizedSwitchLinear)
    assert isinstance(moe.experts.down_proj, QuantizedSwitchLinear)
    if "shared_expert" in moe:
        assert type(moe.shared_expert_gate).__name__ == "Linear"
    out = np.array(model(mx.array([ids]))[0])
    diff = np.abs(out - ref)
    print(f"{variant} 8-bit: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    # 8-bit affine (group 32) errors are ~0.1% per weight; a token whose top-2 experts are near
    # a tie may switch expert, so bound the mean tightly and the max loosely
    scale = np.abs(ref).max()
    assert diff.mean() < 0.01 * scale
    assert diff.max() < 0.1 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_bfloat16_model_runs_on_cpu(checkpoints):
    """gather_mm is float32-only on MLX's CPU backend; a bf16 model must still run there."""
    _, folder = checkpoints["qwen3_moe-yarn"]
    ids = mx.array([_prompt(9, 40)])  # sorted path for the prefill, then decode below
    ref = np.array(load_model(folder, dtype=mx.float32)(ids)[0])
    model = load_model(folder, dtype=mx.bfloat16)
    out = model(ids)
    assert out.dtype == mx.bfloat16
    diff = np.abs(np.array(out[0].astype(mx.float32)) - ref)
    print(f"bf16: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.mean() < 0.02 * np.abs(ref).max()
    assert len(list(generate_step(model, _prompt(9), model.make_cache(), max_tokens=4))) == 4


def test_converted_quantized_checkpoint_loads_and_matches_in_memory(checkpoints, tmp_path):
    """convert (per-expert tensors -> stacked, quantized) -> load_model == quantize_model."""
    from mlxllm.convert import convert

    _, folder = checkpoints["qwen2_moe"]
    out = convert(folder, tmp_path / "q8", bits=8, group_size=32, dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    model = load_model(out, dtype=mx.float32)
    moe = model.layers[1].mlp
    assert type(moe.gate).__name__ == "Linear"
    assert isinstance(moe.experts.up_proj, QuantizedSwitchLinear)

    expected = load_model(folder, dtype=mx.float32)
    quantize_model(expected, make_predicate("uniform", 8, 32))
    ids = mx.array([_prompt(10, 40)])
    np.testing.assert_allclose(np.array(model(ids)), np.array(expected(ids)), rtol=1e-5, atol=1e-5)


def test_convert_handles_experts_split_across_shards(checkpoints, tmp_path):
    """Hub checkpoints may put half of a layer's experts in one shard and half in the next."""
    from safetensors.numpy import load_file, save_file

    from mlxllm.convert import convert

    _, folder = checkpoints["qwen2_moe"]
    split = tmp_path / "split"
    split.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (split / f.name).write_bytes(f.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    first = {k: v for k, v in tensors.items() if ".experts." not in k or ".experts.7." not in k}
    second = {k: v for k, v in tensors.items() if k not in first}
    assert second and any(".experts.0." in k for k in first)
    save_file(first, split / "model-00001-of-00002.safetensors")
    save_file(second, split / "model-00002-of-00002.safetensors")
    wmap = {k: "model-00001-of-00002.safetensors" for k in first}
    wmap.update({k: "model-00002-of-00002.safetensors" for k in second})
    (split / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))

    out = convert(split, tmp_path / "out", dtype="float32", progress=False)
    ids = mx.array([_prompt(11, 20)])
    want = np.array(load_model(folder, dtype=mx.float32)(ids))
    np.testing.assert_array_equal(np.array(load_model(out, dtype=mx.float32)(ids)), want)
