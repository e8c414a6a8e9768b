"""DeepSeek families through our real loader against reference implementations.

- ``deepseek_v2`` / ``deepseek_v3``: tiny random transformers checkpoints (float32,
  ``save_pretrained``), oracle = transformers' own modeling code (torch CPU).
- ``deepseek`` (DeepSeekMoE 16B; not in transformers): oracle = mlx-lm's ``deepseek`` model,
  whose random weights we save in the Hugging Face layout (one tensor per expert).
- V3 multi-token-prediction layers: set aside by the loader, never silently dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from helpers import SMOL, TOKENIZER_FILES, fixture_model, hf_greedy
from mlxllm.generation.step import generate_step
from mlxllm.loader import load_model
from mlxllm.models import deepseek

VOCAB, N_GREEDY = 512, 32

# 3 layers: the first dense (first_k_dense_replace = 1), two MoE; 8 routed experts in 4 groups
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=VOCAB,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=128,  # = factor * original_max_position_embeddings (YaRN)
    rms_norm_eps=1e-6,
)
# DeepSeek-V3's YaRN keys, scaled down so that positions pass the original context of 32;
# mscale != mscale_all_dim so that YaRN's attention factor is not 1 (V3 itself has them equal)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=32,
    mscale=1.0,
    mscale_all_dim=0.707,
    beta_fast=32,
    beta_slow=1,
)
VARIANTS = {
    # V2-Lite layout: no query LoRA, greedy routing
    "v2-lite": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy"),
    # V2: query LoRA, device-limited routing (2 of 4 groups)
    "v2-glg": dict(
        model_type="deepseek_v2",
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    # V3: noaux_tc with a non-zero correction bias, 4 groups, YaRN
    "v3-yarn": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=YARN,
        num_nextn_predict_layers=0,
    ),
    # V3 with rotate-half RoPE (rope_interleave = False)
    "v3-rotate-half": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        rope_interleave=False,
        num_nextn_predict_layers=0,
    ),
}


def make_tiny_deepseek(variant: str, out: Path, seed: int = 0, **overrides):
    """Save a random float32 transformers DeepSeek-V2/V3; returns the torch model (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**COMMON, **VARIANTS[variant], **overrides}
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        # random init is tiny; widen (std 0.1) so logits and routing are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)  # HF initializes it to zeros: then it would prove nothing
    model.save_pretrained(out, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, variant in enumerate(VARIANTS):
        folder = tmp_path_factory.mktemp(variant)
        out[variant] = (make_tiny_deepseek(variant, folder, seed=i), folder)
    return out


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _set_form(model, form: str):
    for layer in model.layers:
        if form == "absorbed":
            layer.self_attn.absorb_max_len = 1 << 30
        elif form == "expanded":
            layer.self_attn.absorb_max_len = 0


@pytest.mark.parametrize("form", ["by-cost", "absorbed", "expanded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant, form):
    hf_model, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    _set_form(model, form)
    ids = _ids(56, 1)  # 56 positions: past YaRN's original context of 32
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    diff = np.abs(ours - ref)
    print(f"{variant}/{form}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(checkpoints, variant):
    hf_model, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    ids = _ids(24, 2)  # 24 + 32 generated = 56 positions
    want = hf_greedy(hf_model, ids, N_GREEDY)
    got = list(generate_step(model, ids, model.make_cache(), max_tokens=N_GREEDY))
    assert got == want
    assert len(set(got)) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_recompute(checkpoints, variant):
    _, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    ids = _ids(56, 3)
    full = np.array(model(mx.array([ids]))[0])
    cache = model.make_cache()
    assert all(type(c).__name__ == "LatentCache" for c in cache)
    # absorbed up to 32 inputs here (r = 32, nope = v = 16): prefill 9 and a chunk of 5
    # (absorbed), a chunk of 34 (expanded, reading the cache), then single steps (absorbed)
    assert model.layers[0].self_attn.absorb_max_len == 32
    chunks = [(0, 9), (9, 14), (14, 48)] + [(i, i + 1) for i in range(48, 56)]
    pieces = [model(mx.array([ids[a:b]]), cache=cache) for a, b in chunks]
    stepped = np.concatenate([np.array(p[0]) for p in pieces])
    assert cache[0].offset == len(ids)
    diff = np.abs(stepped - full).max()
    print(f"{variant}: cached vs full recompute max |diff| {diff:.2e}")
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["v2-lite", "v2-glg", "v3-yarn"])
def test_routing_spreads_over_experts(checkpoints, variant, monkeypatch):
    """Parity would be weak if every token went to the same two experts."""
    _, folder = checkpoints[variant]
    model = load_model(folder, dtype=mx.float32)
    chosen = []
    call = deepseek.Router.__call__

    def spy(self, x):
        indices, weights = call(self, x)
        chosen.append(np.array(indices).reshape(-1, indices.shape[-1]))
        return indices, weights

    monkeypatch.setattr(deepseek.Router, "__call__", spy)
    model(mx.array([_ids(48, 4)]))
    assert len(chosen) == 2  # the two MoE layers
    for layer_choice in chosen:
        used = np.unique(layer_choice)
        print(f"{variant}: experts used {used.tolist()}")
        assert len(used) >= 6  # of 8
        if variant == "v2-glg" or variant == "v3-yarn":
            # group-limited: each token's experts lie in at most topk_group = 2 of 4 groups
            groups = layer_choice // 2
            assert all(len(set(g)) <= 2 for g in groups)


@pytest.mark.parametrize("ablation", ["no-rope-scaling", "no-correction-bias", "no-mscale"])
def test_v3_features_are_exercised(checkpoints, ablation):
    """Dropping a feature must break parity, or the V3 test above proves nothing about it."""
    hf_model, folder = checkpoints["v3-yarn"]
    model = load_model(folder, dtype=mx.float32)
    if ablation == "no-rope-scaling":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": YARN["rope_theta"]}
        from mlxllm.models import build_model

        plain = build_model(cfg)
        assert "aside_weights" not in model.parameters()  # kept aside, not a parameter
        plain.update(model.parameters())
        model = plain
    for layer in model.layers:
        if ablation == "no-correction-bias" and "gate" in layer.mlp:
            layer.mlp.gate.e_score_correction_bias = mx.zeros_like(
                layer.mlp.gate.e_score_correction_bias
            )
        if ablation == "no-mscale":
            layer.self_attn.scale = (
                COMMON["qk_nope_head_dim"] + COMMON["qk_rope_head_dim"]
            ) ** -0.5
    ids = _ids(56, 1)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(ours - ref).max() > 1e-2


def test_v3_mtp_layers_are_set_aside(tmp_path):
    """A V3 checkpoint with ``num_nextn_predict_layers = 1`` stores the MTP layer as
    ``model.layers.{num_hidden_layers}.*`` (DeepSeek-V3: layer 61 of 61): kept aside, by name."""
    from safetensors.numpy import load_file, save_file

    hf_model = make_tiny_deepseek("v3-yarn", tmp_path, num_nextn_predict_layers=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    n = cfg["num_hidden_layers"]
    tensors = load_file(tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    # what DeepSeek's MTP module holds: projections, norms, a shared head, a full MoE block
    mtp = {
        f"model.layers.{n}.{k[len('model.layers.2.') :]}": rng.normal(size=v.shape).astype(v.dtype)
        for k, v in tensors.items()
        if k.startswith("model.layers.2.")
    }
    mtp.update(
        {
            f"model.layers.{n}.enorm.weight": np.ones(64, np.float32),
            f"model.layers.{n}.hnorm.weight": np.ones(64, np.float32),
            f"model.layers.{n}.eh_proj.weight": rng.normal(size=(64, 128)).astype(np.float32),
            f"model.layers.{n}.shared_head.norm.weight": np.ones(64, np.float32),
            f"model.layers.{n}.shared_head.head.weight": rng.normal(size=(VOCAB, 64)).astype(
                np.float32
            ),
        }
    )
    assert f"model.layers.{n}.mlp.experts.3.up_proj.weight" in mtp  # per-expert names kept
    save_file({**tensors, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = load_model(tmp_path, dtype=mx.float32)
    assert set(model.aside_weights) == set(mtp)
    for k, v in mtp.items():
        np.testing.assert_array_equal(np.array(model.aside_weights[k]), v)
    # and the model itself is untouched by them
    ids = _ids(40, 5)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(model(mx.array([ids]))[0]), ref, rtol=1e-4, atol=1e-4)


# ---- DeepSeekMoE 16B (model_type "deepseek"): against mlx-lm --------------------------------

V1 = dict(
    model_type="deepseek",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=2,
    n_routed_experts=8,
    num_experts_per_tok=3,
    moe_layer_freq=2,  # MoE at layers 2 and 4 (1 and 3 stay dense)
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    attention_bias=False,
)


def make_tiny_deepseek_v1(out: Path):
    """mlx-lm's deepseek with random weights, saved as a Hugging Face checkpoint would be."""
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models.deepseek import Model, ModelArgs

    mx.random.seed(0)
    ref = Model(ModelArgs(**V1))

    def widen(path, p):
        return p if "norm" in path else mx.random.normal(p.shape) * 0.1

    ref.update(tree_map_with_path(widen, ref.parameters()))
    weights = {}
    for k, v in tree_flatten(ref.parameters()):
        if ".mlp.switch_mlp." in k:
            # mlx-lm stacks experts; HF checkpoints hold model.layers.L.mlp.experts.E.NAME.weight
            prefix, rest = k.split(".switch_mlp.")
            for e in range(v.shape[0]):
                weights[f"{prefix}.experts.{e}.{rest}"] = v[e]
        else:
            weights[k] = v
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(V1, architectures=["DeepseekForCausalLM"])))
    return weights


def test_deepseek_moe_v1_matches_mlx_lm(tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    weights = make_tiny_deepseek_v1(tmp_path)
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in weights
    assert "model.layers.1.mlp.gate_proj.weight" in weights  # dense off moe_layer_freq
    ours = load_model(tmp_path, dtype=mx.float32)
    ref, _ = mlx_lm_load_model(tmp_path)
    assert type(ours.layers[2].mlp).__name__ == "MoE"
    assert type(ours.layers[3].mlp).__name__ == "SwiGLU"
    ids = mx.array([_ids(40, 6)])
    a, b = np.array(ours(ids)[0]), np.array(ref(ids)[0])
    diff = np.abs(a - b)
    print(f"deepseek (v1) vs mlx-lm: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    assert np.abs(b).max() > 0.5  # logits are not ~0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # cached decode == full recompute on the GQA (KVCache) path of the family
    cache = ours.make_cache()
    assert all(type(c).__name__ == "KVCache" for c in cache)
    pieces = [ours(ids[:, :11], cache=cache)] + [
        ours(ids[:, i : i + 1], cache) for i in range(11, 40)
    ]
    stepped = np.concatenate([np.array(p[0]) for p in pieces])
    np.testing.assert_allclose(stepped, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [None, 8])
def test_mlx_community_v3_layout_loads(tmp_path, bits):
    """mlx-lm converts DeepSeek-V3 with ``kv_b_proj`` split into ``embed_q``/``unembed_out``
    (quantized along their last axes); our loader rebuilds ``kv_b_proj`` and computes what
    mlx-lm computes on that checkpoint (and, unquantized, what transformers computes)."""
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm import load as mlx_lm_load

    dims = dict(qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=64, q_lora_rank=32)
    # default RoPE: mlx-lm 0.32 reads no transformers-5 rope_parameters (it would run without
    # YaRN, see test_convert), and this test is about the attention weights' layout
    dims["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0)
    hf_model = make_tiny_deepseek("v3-yarn", tmp_path / "hf", seed=5, **dims)
    for f in TOKENIZER_FILES:  # mlx_lm.convert needs a tokenizer next to the weights
        if (fixture_model(SMOL) / f).exists():
            shutil.copy(fixture_model(SMOL) / f, tmp_path / "hf" / f)
    out = tmp_path / "mlx"
    quant = dict(quantize=True, q_group_size=32, q_bits=bits) if bits else {}
    mlx_lm_convert(str(tmp_path / "hf"), str(out), dtype="float32", **quant)
    from safetensors import safe_open

    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "np") as sf:
            keys |= set(sf.keys())
    assert "model.layers.1.self_attn.embed_q.weight" in keys
    assert not any("kv_b_proj" in k for k in keys)
    assert (bits is not None) == ("model.layers.1.self_attn.embed_q.scales" in keys)

    ids = _ids(40, 3)
    ours = np.array(load_model(out, dtype=mx.float32)(mx.array([ids]))[0])
    if bits is None:
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    theirs_model, _ = mlx_lm_load(str(out))
    theirs = np.array(theirs_model(mx.array([ids]))[0].astype(mx.float32))
    diff = np.abs(ours - theirs).max()
    print(f"bits={bits}: max |ours - mlx-lm| {diff:.2e}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)


# ---- training and prefill with query-chunked MLA --------------------------------------------


KV_B_TARGETS = ("q_proj", "kv_b_proj", "o_proj")


def _chunked_model(folder, budget: int, form: str | None = None):
    model = load_model(folder, dtype=mx.float32)
    for layer in model.layers:
        layer.self_attn.max_score_elems = budget
    if form:
        _set_form(model, form)
    return model


def _spy_attention(monkeypatch) -> list[int]:
    """Record the query length of every attention call inside ``chunked_attention``."""
    from mlxllm.layers import mla

    lengths = []
    inner = mla._attention

    def spy(q, *args):
        lengths.append(q.shape[2])
        return inner(q, *args)

    monkeypatch.setattr(mla, "_attention", spy)
    return lengths


def _randomize_lora_b(model, seed: int = 1):
    """A trained-looking adapter: ``lora_b != 0``, so ``lora_a`` gets gradients too."""
    from mlxllm.lora.layers import LoRALinear

    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.02 * mx.random.normal(m.lora_b.shape)
    mx.eval(model.parameters())


def _grads(step, batch) -> dict:
    loss, _, g = step(*batch, None, False)  # update=False: the gradients, no optimizer step
    mx.eval(loss, g)
    return {k: np.array(v) for k, v in tree_flatten(g)}, loss.item()


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_compiled_lora_step_with_chunked_mla(checkpoints, monkeypatch, form):
    """``make_step(compiled=True)`` on a DeepSeek-V2 whose MLA takes query chunks (and whose MoE
    layers take the sorted expert path): it runs, its gradients equal the eager step's, and a
    few compiled steps lower the loss. Adapters on q_proj, kv_b_proj (which the absorbed form
    reads as a matrix) and o_proj."""
    import mlx.optimizers as optim

    from mlxllm.lora.layers import apply_lora
    from mlxllm.lora.train import make_step

    _, folder = checkpoints["v2-lite"]
    model = _chunked_model(folder, budget=2000, form=form)
    mx.random.seed(0)
    apply_lora(model, rank=4, targets=KV_B_TARGETS)
    _randomize_lora_b(model)
    ids = mx.array(np.random.default_rng(7).integers(0, VOCAB, (2, 41)))
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((2, 40)))
    lengths = _spy_attention(monkeypatch)

    opt = optim.Adam(learning_rate=5e-4)
    opt.init(model.trainable_parameters())
    eager, eager_loss = _grads(make_step(model, opt, 1, compiled=False), batch)
    assert lengths and max(lengths) < 40  # 2 * 4 heads * 40 keys * L <= 2000: L <= 6
    lengths.clear()
    compiled_step = make_step(model, opt, 1, compiled=True)
    compiled, compiled_loss = _grads(compiled_step, batch)
    assert lengths and max(lengths) < 40  # traced through the chunked path
    assert abs(compiled_loss - eager_loss) <= 1e-5 * eager_loss
    assert set(compiled) == set(eager)
    assert "model.layers.2.self_attn.kv_b_proj.lora_a" in eager
    for k in eager:
        assert np.abs(eager[k]).max() > 0, k  # every adapter gets a gradient
        np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-6, err_msg=k)

    losses = []
    for _ in range(4):
        loss, _, _ = compiled_step(*batch, None, True)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        losses.append(loss.item())
    print(f"{form}: compiled losses {[round(v, 4) for v in losses]}")
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # one batch: goes down


def test_prefill_chunks_follow_the_score_budget(checkpoints, monkeypatch):
    """Generation's prefill feeds at most ``model.max_queries(offset)`` positions per call, so
    one call's MLA scores fit one chunk (the layers no longer evaluate chunk by chunk); the
    result is the full recompute's."""
    from mlxllm.generation.step import prefill

    _, folder = checkpoints["v3-yarn"]
    model = _chunked_model(folder, budget=4 * 40 * 40)  # 40 queries at offset 0, fewer later
    ids = _ids(120, 8)
    full = np.array(model(mx.array([ids]))[0, -1])
    calls = []
    forward = type(model).__call__

    def spy(self, x, cache=None):
        calls.append((cache[0].offset, x.shape[1]))
        return forward(self, x, cache)

    monkeypatch.setattr(type(model), "__call__", spy)
    lengths = _spy_attention(monkeypatch)
    cache = model.make_cache()
    prefill(model, ids[:-1], cache, chunk=32)
    monkeypatch.undo()
    print(f"prefill calls (offset, length): {calls}")
    assert calls[0] == (0, 32)  # the chunk cap holds while the budget allows more
    assert [n for _, n in calls] == sorted((n for _, n in calls), reverse=True)
    assert calls[-1][1] < 16 and sum(n for _, n in calls) == len(ids) - 1
    for offset, n in calls:
        assert n == min(32, model.max_queries(offset), len(ids) - 1 - offset)
        assert 4 * n * (offset + n) <= 4 * 40 * 40 or n == 1
    assert set(lengths) == {n for _, n in calls}  # no call was split into query chunks
    last = np.array(model(mx.array([ids[-1:]]), cache=cache)[0, -1])
    np.testing.assert_allclose(last, full, rtol=1e-4, atol=1e-4)


# ---- LoRA on kv_b_proj (read as a matrix by the absorbed form) ------------------------------


def _quantized(model, bits):
    from mlxllm.quant import make_predicate, quantize_model

    if bits:
        quantize_model(model, make_predicate("uniform", bits, 32))
        assert type(model.layers[0].self_attn.kv_b_proj).__name__ == "QuantizedLinear"
    return model


def _forms_agree(model, ids, tol=1e-4) -> np.ndarray:
    """Logits in the absorbed and the expanded form (equal), returned."""
    _set_form(model, "absorbed")
    absorbed = np.array(model(ids)[0])
    _set_form(model, "expanded")
    expanded = np.array(model(ids)[0])
    diff = np.abs(absorbed - expanded).max()
    print(f"absorbed vs expanded with the adapter: max |diff| {diff:.2e}")
    np.testing.assert_allclose(absorbed, expanded, rtol=tol, atol=tol)
    return expanded


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bits", [None, 4])
def test_lora_on_kv_b_proj_absorbed_equals_expanded(checkpoints, bits, dora):
    """With an adapter on kv_b_proj (float base or QLoRA, LoRA or DoRA) the absorbed form, which
    reads kv_b_proj as a matrix, computes what the expanded form (which calls it) computes:
    logits, a changed adapter (no stale cached W_UK/W_UV) and the adapter's gradients."""
    from mlxllm.lora.layers import apply_lora
    from mlxllm.lora.train import masked_loss

    _, folder = checkpoints["v2-glg"]
    model = _quantized(load_model(folder, dtype=mx.float32), bits)
    ids = mx.array([_ids(24, 9)])
    base = np.array(model(ids)[0])
    mx.random.seed(0)
    apply_lora(model, rank=4, targets=KV_B_TARGETS, dora=dora)
    np.testing.assert_allclose(_forms_agree(model, ids), base, rtol=1e-4, atol=1e-4)  # at init
    _randomize_lora_b(model)
    adapted = _forms_agree(model, ids)
    assert np.abs(adapted - base).max() > 1e-2  # the adapter acts

    # a new adapter value (what an optimizer step assigns) is seen by the absorbed form
    kv_b = model.layers[1].self_attn.kv_b_proj
    kv_b.lora_b = kv_b.lora_b * 3
    again = _forms_agree(model, ids)
    assert np.abs(again - adapted).max() > 1e-3

    grads = {}
    for form in ("absorbed", "expanded"):
        _set_form(model, form)
        _, g = nn.value_and_grad(model, masked_loss)(
            model, ids[:, :-1], ids[:, 1:], mx.ones((1, 23))
        )
        grads[form] = {k: np.array(v) for k, v in tree_flatten(g) if ".kv_b_proj." in k}
    names = {f"model.layers.{i}.self_attn.kv_b_proj.lora_{w}" for i in range(3) for w in "ab"}
    assert names <= set(grads["absorbed"])
    for k, g in grads["absorbed"].items():
        assert np.abs(g).max() > 0, k
        np.testing.assert_allclose(g, grads["expanded"][k], rtol=1e-3, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("bits", [None, 4])
def test_fuse_with_kv_b_proj_adapter_equals_unfused(checkpoints, tmp_path, bits):
    """``fuse_model`` and ``mlxllm fuse`` (``mlxllm.lora.fuse``) with an adapter on kv_b_proj
    give the unfused adapter's logits; on a quantized base (QLoRA, a folder written by
    ``convert``) fused to float, and re-quantized with the base's settings."""
    from mlxllm.convert import convert
    from mlxllm.layers.linear import dense_weight
    from mlxllm.lora import fuse
    from mlxllm.lora.layers import LoRALinear, apply_lora, fuse_model, load_adapter, save_adapter

    _, hf = checkpoints["v3-yarn"]
    folder = hf
    if bits:
        folder = convert(
            hf, tmp_path / "q4", bits=bits, group_size=32, dtype="float32", progress=False
        )
    model = load_model(folder, dtype=mx.float32)
    mx.random.seed(0)
    apply_lora(model, rank=4, targets=KV_B_TARGETS)
    _randomize_lora_b(model)
    ids = mx.array([_ids(40, 10)])  # 40 > 32: the by-cost form is expanded; decode is absorbed
    unfused = np.array(model(ids)[0])
    save_adapter(model, tmp_path / "adapter")

    fuse_model(model, dequantize=True)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert type(model.layers[0].self_attn.kv_b_proj).__name__ == "Linear"
    in_memory = _forms_agree(model, ids)
    np.testing.assert_allclose(in_memory, unfused, rtol=1e-4, atol=1e-4)

    out = fuse(folder, tmp_path / "adapter", tmp_path / "fused", dequantize=True)
    fused = load_model(out, dtype=mx.float32)
    assert type(fused.layers[0].self_attn.kv_b_proj).__name__ == "Linear"
    diff = np.abs(_forms_agree(fused, ids) - unfused).max()
    print(f"bits={bits}: mlxllm fuse (float) vs unfused adapter: max |diff| {diff:.2e}")
    assert diff < 1e-4
    if bits:
        out = fuse(folder, tmp_path / "adapter", tmp_path / "requantized")
        requantized = load_model(out, dtype=mx.float32)
        kv_b = requantized.layers[0].self_attn.kv_b_proj
        assert type(kv_b).__name__ == "QuantizedLinear" and kv_b.bits == bits
        # the fused float weight on the base's grid: MLX's affine rounding (the zero point is
        # snapped to the grid) is off by less than one step (|scale|) per weight
        err = np.abs(np.array(dense_weight(kv_b) - model.layers[0].self_attn.kv_b_proj.weight))
        assert (err <= np.repeat(np.abs(np.array(kv_b.scales)), 32, axis=1) * 1.001).all()
        # and the folder computes what the re-quantizing fuse computes in memory
        mem = load_adapter(load_model(folder, dtype=mx.float32), tmp_path / "adapter")
        want = _forms_agree(fuse_model(mem), ids)
        np.testing.assert_allclose(_forms_agree(requantized, ids), want, rtol=1e-5, atol=1e-5)
