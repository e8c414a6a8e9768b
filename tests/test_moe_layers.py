"""MoE layers alone: routers against transformers' router modules, stacked experts against a
per-expert loop, the expert-sorted path, bf16 on CPU, quantized experts, ``stack_experts``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlxllm.errors import MlxllmError
from mlxllm.layers.moe import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    _sort_by_expert,
    group_limited_greedy,
    noaux_tc,
    softmax_topk,
)
from mlxllm.models.transforms import stack_experts

D, H, E, K, N = 64, 32, 16, 4, 50  # width, expert hidden, experts, top-k, tokens


def _hidden(seed=0, n=N, d=D):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _router_weight(seed=1, e=E, d=D):
    return (np.random.default_rng(seed).standard_normal((e, d)) * 0.3).astype(np.float32)


def _by_index(indices, weights):
    """Order each token's (index, weight) pairs by index: routers return them unordered."""
    indices, weights = np.asarray(indices), np.asarray(weights)
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(indices, order, -1), np.take_along_axis(weights, order, -1)


def _compare(ours, theirs):
    oi, ow = _by_index(*ours)
    ti, tw = _by_index(*theirs)
    np.testing.assert_array_equal(oi, ti)
    np.testing.assert_allclose(ow, tw, rtol=1e-5, atol=1e-6)
    assert np.asarray(ours[1]).dtype == np.float32


# ---- routers against transformers' own router modules ----


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_topk_matches_qwen2_moe_router(norm_topk_prob):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(
        hidden_size=D, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm_topk_prob
    )
    router = Qwen2MoeTopKRouter(cfg)
    x, w = _hidden(), _router_weight()
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        _, t_weights, t_indices = router(torch.from_numpy(x))
    ours = softmax_topk(mx.array(x @ w.T), K, norm_topk_prob)
    _compare(ours, (t_indices.numpy(), t_weights.numpy()))
    if norm_topk_prob:
        np.testing.assert_allclose(np.array(ours[1]).sum(-1), 1.0, rtol=1e-6)


def test_group_limited_greedy_matches_deepseek_v2_router():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    n_group, topk_group, factor = 4, 2, 2.5
    cfg = DeepseekV2Config(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        topk_method="group_limited_greedy",
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=factor,
    )
    router = DeepseekV2TopkRouter(cfg)
    assert router.num_experts == E
    x, w = _hidden(2), _router_weight(3)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        _, t_weights, t_indices = router(torch.from_numpy(x))
    logits = mx.array(x @ w.T)
    ours = group_limited_greedy(logits, K, n_group, topk_group, routed_scaling_factor=factor)
    _compare(ours, (t_indices.numpy(), t_weights.numpy()))
    # the group limit must matter for some tokens, or this proves no more than plain top-k
    plain, _ = _by_index(*softmax_topk(logits, K, False))
    assert (plain != _by_index(*ours)[0]).any(axis=-1).sum() > 5
    groups = np.array(ours[0]) // (E // n_group)
    assert max(len(set(g)) for g in groups.tolist()) <= topk_group


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_noaux_tc_matches_deepseek_v3_router(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    n_group, topk_group, factor = 4, 2, 2.5
    cfg = DeepseekV3Config(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=factor,
    )
    router = DeepseekV3TopkRouter(cfg)
    assert router.num_experts == E
    x, w = _hidden(4), _router_weight(5)
    bias = np.random.default_rng(6).uniform(-0.3, 0.3, E).astype(np.float32)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w))
        router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, t_weights, t_indices = router(torch.from_numpy(x))
    logits = mx.array(x @ w.T)
    ours = noaux_tc(logits, mx.array(bias), K, n_group, topk_group, norm_topk_prob, factor)
    _compare(ours, (t_indices.numpy(), t_weights.numpy()))
    # the bias must change some choices, and weights must come from unbiased scores
    unbiased = noaux_tc(logits, mx.zeros(E), K, n_group, topk_group, norm_topk_prob, factor)
    assert (_by_index(*unbiased)[0] != _by_index(*ours)[0]).any(axis=-1).sum() > 5
    sig = 1 / (1 + np.exp(-(x @ w.T)))
    picked = np.take_along_axis(sig, np.array(ours[0]), -1)
    if norm_topk_prob:
        picked = picked / picked.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(ours[1]), picked * factor, rtol=1e-5)


# ---- stacked experts ----


def _loop_reference(glu: SwitchGLU, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per (token, slot): ``down_e(silu(gate_e x) * up_e x)`` with plain numpy matmuls."""
    g, u, d = (
        np.array(p.weight, dtype=np.float32) for p in (glu.gate_proj, glu.up_proj, glu.down_proj)
    )
    bias = "bias" in glu.gate_proj
    out = np.zeros((*indices.shape, x.shape[-1]), np.float32)
    for t in range(indices.shape[0]):
        for s in range(indices.shape[1]):
            e = indices[t, s]
            a, b = g[e] @ x[t], u[e] @ x[t]
            if bias:
                a, b = a + np.array(glu.gate_proj.bias[e]), b + np.array(glu.up_proj.bias[e])
            h = a / (1 + np.exp(-a)) * b
            out[t, s] = d[e] @ h + (np.array(glu.down_proj.bias[e]) if bias else 0)
    return out


def _glu(bias=False, seed=0):
    mx.random.seed(seed)
    glu = SwitchGLU(D, H, E, bias=bias)
    if bias:
        for p in (glu.gate_proj, glu.up_proj, glu.down_proj):
            p.bias = mx.random.normal(p.bias.shape) * 0.1
    return glu


def _indices(n=N, seed=7):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(E, K, replace=False) for _ in range(n)]).astype(np.int32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_switch_glu_matches_per_expert_loop(bias, sort):
    glu, x, idx = _glu(bias), _hidden(8), _indices()
    ours = np.array(glu(mx.array(x), mx.array(idx), sort=sort))
    ref = _loop_reference(glu, x, idx)
    print(f"bias={bias} sort={sort}: max |diff| {np.abs(ours - ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def _sorted_gather_mm(glu, x, idx):
    """The expert-sorted ``gather_mm`` path (what a GPU takes; the CPU uses per-expert matmuls)."""
    rows, sidx, inverse = _sort_by_expert(x.reshape(-1, D), idx.reshape(-1, K))
    return glu._experts(rows, sidx, True)[inverse].reshape(*idx.shape, D)


@pytest.mark.parametrize("quantized", [False, True])
def test_sorted_paths_equal_unsorted_with_batch_dims(quantized):
    glu = _glu(bias=True)
    if quantized:
        nn.quantize(glu, group_size=32, bits=4)
    x = mx.array(_hidden(9, n=2 * 40).reshape(2, 40, D))
    idx = mx.array(_indices(80).reshape(2, 40, K))
    assert idx.size >= 64  # the default picks a sorted path here
    unsorted = np.array(glu(x, idx, sort=False))
    for name, y in [
        ("default", glu(x, idx)),
        ("sorted", glu(x, idx, sort=True)),
        ("sorted gather_mm", _sorted_gather_mm(glu, x, idx)),
    ]:
        assert y.shape == (2, 40, K, D), name
        diff = np.abs(np.array(y) - unsorted).max()
        print(f"quantized={quantized} {name}: max |diff| vs unsorted {diff:.2e}")
        np.testing.assert_allclose(np.array(y), unsorted, rtol=1e-5, atol=1e-5, err_msg=name)
    # a single decode token: [1, 1, D] with [1, 1, K]
    one = np.array(glu(x[:1, :1], idx[:1, :1]))
    np.testing.assert_allclose(one[0, 0], unsorted[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_cpu_segments_with_unused_and_rare_experts(quantized):
    """Unused experts have zero rows (skipped); rare ones have fewer rows than the quantized
    path's dequantize threshold (quantized_matmul instead)."""
    glu, x = _glu(bias=True), _hidden(13, n=40)
    idx = np.tile(np.array([[1, 5, 9, 14]], np.int32), (40, 1))
    idx[:2] = [0, 2, 3, 4]  # 2 rows each
    ref = _loop_reference(glu, x, idx)
    if quantized:
        nn.quantize(glu, group_size=32, bits=8)
        ref = np.array(glu(mx.array(x), mx.array(idx), sort=False))  # gather_qmm
    ours = np.array(glu(mx.array(x), mx.array(idx), sort=True))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_sorted_experts_compile_and_differentiate(quantized):
    """Under ``mx.compile`` (the compiled finetune step) the CPU's per-expert segments cannot
    read their row counts on the host; the sorted path then takes ``gather_mm``: same values
    and input gradients as eager (which takes the segments)."""
    glu = _glu(bias=True)
    if quantized:
        nn.quantize(glu, group_size=32, bits=4)
    x, idx = mx.array(_hidden(11, n=40)), mx.array(_indices(40))
    w = mx.softmax(mx.array(_hidden(12, n=40)[:, :K]), axis=-1)

    def loss(x, idx):  # the routing is an input, as in a model: traced, not a constant
        return (glu(x, idx, w, sort=True) ** 2).sum()

    eager_loss, eager_dx = mx.value_and_grad(loss)(x, idx)
    compiled_loss, compiled_dx = mx.compile(mx.value_and_grad(loss))(x, idx)
    np.testing.assert_allclose(compiled_loss.item(), eager_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(compiled_dx), np.array(eager_dx), rtol=1e-4, atol=1e-5)
    assert np.abs(np.array(eager_dx)).max() > 0


@pytest.mark.parametrize("n_tokens", [1, 3, 50])  # gathered-expert cast / full cast + gather_mm
def test_bfloat16_runs_on_cpu_and_is_close(n_tokens):
    glu, x, idx = _glu(), _hidden(10, n=n_tokens), _indices(n_tokens)
    ref = np.array(glu(mx.array(x), mx.array(idx)))
    glu.set_dtype(mx.bfloat16)
    with mx.stream(mx.cpu):
        out = glu(mx.array(x).astype(mx.bfloat16), mx.array(idx))
        assert out.dtype == mx.bfloat16
        out = np.array(out.astype(mx.float32))
    diff = np.abs(out - ref)
    print(f"bf16 n={n_tokens}: max |diff| {diff.max():.2e}, max |ref| {np.abs(ref).max():.2f}")
    assert diff.max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.15)])
def test_quantized_switch_glu_close_to_float(bits, tol):
    glu, x, idx = _glu(bias=True), _hidden(11), _indices()
    ref = np.array(glu(mx.array(x), mx.array(idx)))
    nn.quantize(glu, group_size=32, bits=bits)
    for p in (glu.gate_proj, glu.up_proj, glu.down_proj):
        assert isinstance(p, QuantizedSwitchLinear)
        assert p.weight.dtype == mx.uint32 and p.scales.shape[0] == E
    for sort in (False, True):
        out = np.array(glu(mx.array(x), mx.array(idx), sort=sort))
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"{bits}-bit sort={sort}: max rel diff {rel:.2e}")
        assert rel < tol


def test_quantized_switch_linear_is_per_expert_quantized_linear():
    """Each expert of the stack computes what ``nn.QuantizedLinear`` computes for it alone."""
    mx.random.seed(3)
    sw = SwitchLinear(D, H, E)
    x = mx.array(_hidden(12, n=5))
    idx = mx.array([[e] for e in (0, 3, 3, 15, 7)])
    q = sw.to_quantized(group_size=64, bits=4)
    out = q(x[:, None, None, :], idx)  # [5, 1, 1, H]
    for t, e in enumerate((0, 3, 3, 15, 7)):
        lin = nn.Linear(D, H, bias=False)
        lin.weight = sw.weight[e]
        ql = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)
        np.testing.assert_allclose(np.array(out[t, 0, 0]), np.array(ql(x[t])), rtol=1e-5, atol=1e-5)


# ---- stack_experts ----


def _per_expert(n_layers=2, n_experts=3, params=("weight",)):
    w = {"model.norm.weight": mx.ones(4)}
    for layer in range(n_layers):
        w[f"model.layers.{layer}.mlp.gate.weight"] = mx.zeros((n_experts, 4))
        for e in range(n_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                for p in params:
                    w[f"model.layers.{layer}.mlp.experts.{e}.{name}.{p}"] = mx.full((2, 4), e)
    return w


def test_stack_experts_stacks_in_expert_order():
    out = stack_experts(_per_expert(params=("weight", "scales", "biases")), 3)
    for layer in range(2):
        for name in ("gate_proj", "up_proj", "down_proj"):
            for p in ("weight", "scales", "biases"):
                w = out[f"model.layers.{layer}.mlp.experts.{name}.{p}"]
                assert w.shape == (3, 2, 4)
                assert np.array(w)[:, 0, 0].tolist() == [0, 1, 2]
    assert not any(".experts.0." in k for k in out)
    assert "model.layers.1.mlp.gate.weight" in out and "model.norm.weight" in out
    # 2 layers x 3 projections x 3 params + gate x 2 + norm
    assert len(out) == 2 * 3 * 3 + 2 + 1


def test_stack_experts_is_a_no_op_on_stacked_weights():
    stacked = stack_experts(_per_expert(), 3)
    again = stack_experts(stacked, 3)
    assert again.keys() == stacked.keys()
    assert all(again[k] is stacked[k] for k in stacked)


def test_stack_experts_renames_mlx_lm_switch_mlp():
    w = {"model.layers.0.mlp.switch_mlp.up_proj.scales": mx.zeros((3, 2, 1))}
    assert list(stack_experts(w, 3)) == ["model.layers.0.mlp.experts.up_proj.scales"]


def test_stack_experts_refuses_missing_experts():
    w = _per_expert()
    del w["model.layers.1.mlp.experts.1.up_proj.weight"]
    with pytest.raises(MlxllmError, match="experts present"):
        stack_experts(w, 3)
    # a shard holding experts 0..1 of 3 would otherwise be stacked as a 2-expert layer
    with pytest.raises(MlxllmError, match="2 of 3"):
        stack_experts(_per_expert(n_experts=2), 3)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_weighted_experts_equal_the_weighted_sum(bias, quantized, sort):
    """``glu(x, idx, weights)`` (unsorted: weights folded into the fused SwiGLU before
    ``down_proj``; with a bias or sorted: applied to the outputs) equals the weighted sum of the
    per-expert outputs."""
    glu = _glu(bias=bias)
    if quantized:
        nn.quantize(glu, group_size=32, bits=8)
    x, idx = mx.array(_hidden(14, n=6).reshape(2, 3, D)), mx.array(_indices(6).reshape(2, 3, K))
    w = mx.random.uniform(shape=idx.shape)
    per_expert = glu(x, idx, sort=sort)  # [2, 3, K, D]
    ref = np.array((per_expert * w[..., None]).sum(axis=-2))
    ours = glu(x, idx, w, sort=sort)
    assert ours.shape == (2, 3, D)
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-4, atol=1e-5)


def test_cuda_kernels_only_take_decode_steps():
    """The CUDA decode kernels (no gradient) must never see prefill or training inputs."""
    from mlxllm.kernels import decode_tokens

    assert decode_tokens(mx.zeros((1, 1, 8))) and decode_tokens(mx.zeros((4, 1, 8)))
    assert not decode_tokens(mx.zeros((5, 1, 8)))  # a large decode batch: MLX's gather path
    assert not decode_tokens(mx.zeros((1, 2, 8)))  # two positions (training has >= 2)
    assert not decode_tokens(mx.zeros((8,)))
