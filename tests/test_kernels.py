"""Custom CUDA kernels against their pure-MLX twins (run on a CUDA device: ``-m gpu``).

CI has no GPU and deselects these by marker; they were run on an H200 (see the closing notes).
The twins themselves are what every other test exercises on the CPU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxllm.cache.latent import LatentCache
from mlxllm.kernels import moe_decode
from mlxllm.layers.mlp import SwiGLU
from mlxllm.layers.moe import SwitchGLU, softmax_topk

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not moe_decode.cuda_available():
        pytest.fail("these tests need MLX's CUDA backend (run them with -m gpu on a CUDA device)")


def _rand(shape, dtype, scale=0.05, seed=0):
    return (mx.random.normal(shape, key=mx.random.key(seed)) * scale).astype(dtype)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("N", [1, 3])
def test_route_topk_equals_softmax_topk(norm, N):
    E, D, k = 64, 2048, 6
    x = _rand((N, 1, D), mx.bfloat16, 1.0, seed=1)
    w = _rand((E, D), mx.float32, 0.05, seed=2)
    idx, wts = moe_decode.route_topk(x, w, k, norm, scale=1.5)
    with mx.stream(mx.cpu):  # exact float32 (CUDA matmuls of several rows may use TF32)
        ref_idx, ref_w = softmax_topk(x.astype(mx.float32) @ w.T, k, norm)
        if not norm:
            ref_w = ref_w * 1.5
    idx, wts, ref_idx, ref_w = (np.array(a) for a in (idx, wts, ref_idx, ref_w))
    for t in range(N):
        got = dict(zip(idx[t, 0].tolist(), wts[t, 0].tolist(), strict=True))
        want = dict(zip(ref_idx[t, 0].tolist(), ref_w[t, 0].tolist(), strict=True))
        assert set(got) == set(want)
        np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-4)
    # descending order
    assert (np.diff(wts, axis=-1) <= 0).all()


def _moe(dtype, D=256, hid=64, E=8, shared_mult=2, seed=0):
    mx.random.seed(seed)
    experts = SwitchGLU(D, hid, E)
    shared = SwiGLU(D, hid * shared_mult) if shared_mult else None
    for m in [experts, shared]:
        if m is not None:
            m.update(nn.utils.tree_map(lambda a: mx.random.normal(a.shape) * 0.05, m.parameters()))
            m.set_dtype(dtype)
    return experts, shared


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shared_mult", [0, 2])
@pytest.mark.parametrize("N", [1, 3])
def test_fused_experts_equal_switchglu(dtype, shared_mult, N):
    D, hid, E, k = 256, 64, 8, 3
    experts, shared = _moe(dtype, D, hid, E, shared_mult)
    x = _rand((N, 1, D), dtype, 1.0, seed=3)
    idx = mx.random.randint(0, E, (N, 1, k), key=mx.random.key(4)).astype(mx.int32)
    wts = mx.random.uniform(shape=(N, 1, k), key=mx.random.key(5))
    assert moe_decode.experts_supported(x, experts, shared)
    got = moe_decode.fused_experts(x, idx, wts, experts, shared)
    for m in [experts, shared]:  # the reference in float32 from the same (rounded) weights
        if m is not None:
            m.set_dtype(mx.float32)
    with mx.stream(mx.cpu):  # exact float32 (CUDA matmuls of several rows may use TF32)
        want = experts(x.astype(mx.float32), idx, wts)
        if shared is not None:
            want = want + shared(x.astype(mx.float32))
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=tol, atol=tol
    )


def test_fused_experts_shared_weight():
    """Qwen's sigmoid-gated shared expert: the gate multiplies only the shared part."""
    experts, shared = _moe(mx.float32, shared_mult=4)
    x = _rand((2, 1, 256), mx.float32, 1.0, seed=6)
    idx = mx.array([[[1, 5]], [[7, 0]]], dtype=mx.int32)
    wts = mx.array([[[0.7, 0.3]], [[0.4, 0.6]]])
    gate = mx.array([[[0.25]], [[0.9]]])
    got = moe_decode.fused_experts(x, idx, wts, experts, shared, gate)
    with mx.stream(mx.cpu):
        want = experts(x, idx, wts) + gate * shared(x)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def test_unsupported_falls_back():
    """Quantized experts or long inputs are not for these kernels."""
    experts, shared = _moe(mx.float32)
    assert not moe_decode.experts_supported(mx.zeros((1, 64, 256)), experts, shared)
    nn.quantize(experts, group_size=64, bits=4)
    assert not moe_decode.experts_supported(mx.zeros((1, 1, 256)), experts, shared)


# tiny configs: one shared base, each family adding only its own fields
_BASE = dict(
    vocab_size=300,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
)
_DEEPSEEK = dict(
    _BASE,
    moe_intermediate_size=64,
    n_routed_experts=8,
    first_k_dense_replace=1,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
)
TINY = {
    "deepseek_v2": dict(
        _DEEPSEEK,
        model_type="deepseek_v2",
        n_shared_experts=2,
        num_experts_per_tok=3,
        topk_method="greedy",
    ),
    "deepseek_v3": dict(
        _DEEPSEEK,
        model_type="deepseek_v3",
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=48,
        rope_interleave=False,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=4,
            mscale=1.0,
            mscale_all_dim=0.707,
        ),
    ),
    "qwen2": dict(_BASE, model_type="qwen2", num_key_value_heads=2),
    "qwen2_moe": dict(
        _BASE,
        model_type="qwen2_moe",
        num_key_value_heads=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
    ),
}


@pytest.mark.parametrize("family", list(TINY))
def test_model_decode_with_kernels_equals_twins(family, monkeypatch):
    """A whole MoE model decoding on the GPU: kernels on vs off (the MLX twins)."""
    from mlxllm.models import build_model

    mx.random.seed(0)
    model = build_model(TINY[family])
    model.update(nn.utils.tree_map(lambda a: mx.random.normal(a.shape) * 0.05, model.parameters()))
    mx.eval(model.parameters())
    ids = np.random.default_rng(0).integers(0, 300, 12).tolist()

    def run():
        cache = model.make_cache()
        model(mx.array([ids[:6]]), cache=cache)
        return [np.array(model(mx.array([[t]]), cache=cache)) for t in ids[6:]]

    from mlxllm.kernels import decode
    from mlxllm.layers.mla import MLA

    assert moe_decode.cuda_available()
    fused = run()
    monkeypatch.setattr(moe_decode, "cuda_available", lambda: False)
    monkeypatch.setattr(MLA, "_decode_flags", lambda *a: None)
    monkeypatch.setattr(decode, "_on_cuda", lambda *a: False)
    twin = run()
    for a, b in zip(fused, twin, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("heads", [4, 16])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("traditional", [True, False])
def test_mla_decode_kernels_equal_twins(dtype, traditional, heads, monkeypatch):
    """One MLA layer decoding with the kernels vs the generic absorbed path (YaRN scale != 1);
    16 heads in bfloat16 take the tensor-core attention kernels."""
    from mlxllm.kernels import mla_decode
    from mlxllm.layers.mla import MLA
    from mlxllm.layers.rope import RoPE

    yarn = dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=32,
        mscale=1.0,
        mscale_all_dim=0.707,
    )
    rope = RoPE(16, 10000.0, yarn, traditional=traditional)
    assert rope.scale != 1.0
    mx.random.seed(1)
    layer = MLA(256, heads, 64, 32, 16, 32, rope, q_lora_rank=48, softmax_scale=0.11)
    layer.update(nn.utils.tree_map(lambda a: mx.random.normal(a.shape) * 0.1, layer.parameters()))
    layer.set_dtype(dtype)
    x = _rand((1, 40, 256), dtype, 1.0, seed=7)

    def run():
        cache = LatentCache()
        layer(x[:, :35], cache=cache)  # prefill past the original context (YaRN)
        outs = [layer(x[:, i : i + 1], cache=cache) for i in range(35, 40)]
        return [np.array(o.astype(mx.float32)) for o in outs], np.array(
            cache.joint.astype(mx.float32)
        )

    assert mla_decode.supported(x[:, :1], *layer._kv_b_weights(), 16)
    calls = []
    flash = mla_decode.latent_attention
    monkeypatch.setattr(mla_decode, "latent_attention", lambda *a: calls.append(1) or flash(*a))
    got, got_cache = run()
    assert bool(calls) == (heads == 16 and dtype == mx.bfloat16)
    monkeypatch.setattr(MLA, "_decode_flags", lambda *a: None)
    want, want_cache = run()
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(got_cache, want_cache, rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("N", [1, 3])
def test_add_rms_norm_equals_ops(dtype, N):
    from mlxllm.kernels.decode import add_rms_norm

    norm = nn.RMSNorm(512, eps=1e-5)
    norm.weight = _rand((512,), dtype, 1.0, seed=8) + 1
    x, a = _rand((N, 1, 512), dtype, 1.0, seed=9), _rand((N, 1, 512), dtype, 1.0, seed=10)
    h, n = add_rms_norm(x, a, norm)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_array_equal(
        np.array(h.astype(mx.float32)), np.array((x + a).astype(mx.float32))
    )
    np.testing.assert_allclose(
        np.array(n.astype(mx.float32)), np.array(norm(x + a).astype(mx.float32)), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("N", [1, 3])
def test_gemv2_equals_linears(dtype, N):
    from mlxllm.kernels.decode import gemv2, gemv2_supported

    mx.random.seed(2)
    l1, l2 = nn.Linear(512, 200, bias=False), nn.Linear(512, 72, bias=False)
    l1.set_dtype(dtype)
    l2.set_dtype(dtype)
    x = _rand((N, 1, 512), dtype, 1.0, seed=11)
    assert gemv2_supported(x, l1, l2)
    y1, y2 = gemv2(x, l1, l2)
    with mx.stream(mx.cpu):
        w1, w2 = l1(x.astype(mx.float32)), l2(x.astype(mx.float32))  # float32 of the same weights
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    for got, want in ((y1, w1), (y2, w2)):
        np.testing.assert_allclose(
            np.array(got.astype(mx.float32)), np.array(want), rtol=tol, atol=tol
        )


def test_fused_experts_residual():
    experts, shared = _moe(mx.bfloat16, shared_mult=2)
    x = _rand((1, 1, 256), mx.bfloat16, 1.0, seed=12)
    res = _rand((1, 1, 256), mx.bfloat16, 1.0, seed=13)
    idx = mx.array([[[2, 6, 1]]], dtype=mx.int32)
    wts = mx.array([[[0.5, 0.3, 0.2]]])
    plain = moe_decode.fused_experts(x, idx, wts, experts, shared)
    with_res = moe_decode.fused_experts(x, idx, wts, experts, shared, residual=res)
    np.testing.assert_array_equal(
        np.array(with_res.astype(mx.float32)), np.array((res + plain).astype(mx.float32))
    )


@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("S", [1, 63, 64, 65, 1000, 8193])
def test_latent_attention_equals_sdpa(B, S, dt):
    """Tensor-core latent attention + W_UV vs plain float32 attention and W_UV on the CPU,
    reading a prefix view of a longer cache buffer (as ``LatentCache.joint`` is)."""
    from mlxllm.kernels import mla_decode

    H, r, dr, v = 16, 512, 64, 128
    q = _rand((B, H, 1, r + dr), dt, 1.0, seed=14)
    buffer = _rand((B, 1, S + 300, r + dr), dt, 1.0, seed=15)
    kv = buffer[:, :, :S]
    w_uv = _rand((H, v, r), dt, 0.05, seed=16)
    assert mla_decode.flash_supported(q.dtype, kv.shape[-1], w_uv)
    got = mla_decode.latent_attention(q, kv, 0.07, w_uv)
    with mx.stream(mx.cpu):
        q32, kv32 = q.astype(mx.float32), kv.astype(mx.float32)
        p = mx.softmax((q32 @ kv32.swapaxes(-1, -2)) * 0.07, axis=-1)  # [B, H, 1, S]
        o = p @ kv32[..., :r]  # [B, H, 1, r]
        want = (o @ w_uv.astype(mx.float32).swapaxes(-1, -2)).transpose(0, 2, 1, 3)
        want = want.reshape(B, 1, H * v)
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(want), rtol=3e-2, atol=3e-2
    )


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 64), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shared_mult", [0, 2])
def test_fused_quantized_experts_equal_gather_qmm(bits, group_size, dtype, shared_mult):
    """Affine 4/8-bit experts (and shared experts): kernels vs SwitchGLU over gather_qmm."""
    experts, shared = _moe(dtype, D=256, hid=128, shared_mult=shared_mult)
    nn.quantize(experts, group_size=group_size, bits=bits)
    if shared is not None:
        nn.quantize(shared, group_size=group_size, bits=bits)
    x = _rand((2, 1, 256), dtype, 1.0, seed=17)
    idx = mx.array([[[1, 4, 7]], [[0, 4, 2]]], dtype=mx.int32)
    wts = mx.array([[[0.5, 0.3, 0.2]], [[0.6, 0.1, 0.3]]])
    res = _rand((2, 1, 256), dtype, 1.0, seed=18)
    assert moe_decode.quantized_experts_supported(x, experts, shared)
    assert not moe_decode.experts_supported(x, experts, shared)  # the quantized kernels, then
    got = moe_decode.fused_experts(x, idx, wts, experts, shared, residual=res)
    stream = mx.cpu if dtype == mx.float32 else mx.gpu  # CPU is exact with float32 scales
    with mx.stream(stream):
        want = experts(x, idx, wts)
        if shared is not None:
            want = want + shared(x)
        want = res + want.astype(dtype)
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=tol, atol=tol
    )
