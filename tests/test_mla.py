"""MLA invariants: absorbed == expanded, cached == recompute, bounded prefill memory, cache size.

Tiny random MLA layers in float32 (the layer alone, explicit arguments); no checkpoint needed.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map_with_path

from mlxllm.cache.latent import LatentCache
from mlxllm.layers.mla import MLA, absorb_max_len_for, max_queries
from mlxllm.layers.rope import RoPE

DIM, HEADS, R, NOPE, DR, V = 64, 4, 32, 16, 8, 16


def make_mla(seed=0, heads=HEADS, dr=DR, q_lora_rank=None, **kw) -> MLA:
    mx.random.seed(seed)
    rope = RoPE(dr, 10000.0, traditional=True)
    m = MLA(DIM, heads, R, NOPE, dr, V, rope, q_lora_rank=q_lora_rank, **kw)

    # random init is too small to make attention peaky; widen non-norm weights (std 0.1)
    def widen(path, p):
        return p if "norm" in path else mx.random.normal(p.shape) * 0.1

    m.update(tree_map_with_path(widen, m.parameters()))
    mx.eval(m.parameters())
    return m


def _inputs(m: MLA, S: int, L: int, seed: int = 1):
    """q_nope, q_pe for the last ``L`` of ``S`` positions, and c_kv, k_pe for all ``S``."""
    x = mx.random.normal((1, S, DIM), key=mx.random.key(seed))
    q_nope, q_pe = m._queries(x[:, S - L :], S - L)
    c_kv, k_pe = m.latent(x, 0)
    return q_nope, q_pe, c_kv, k_pe


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("S", [1, 7, 64, 300])
def test_absorbed_decode_equals_expanded(S, q_lora_rank):
    m = make_mla(q_lora_rank=q_lora_rank)
    q_nope, q_pe, c_kv, k_pe = _inputs(m, S, 1)
    a = m.attend_absorbed(q_nope, q_pe, c_kv, k_pe, None)
    e = m.attend_expanded(q_nope, q_pe, c_kv, k_pe, None)
    diff = mx.abs(a - e).max().item()
    print(f"S={S} q_lora={q_lora_rank}: absorbed vs expanded decode max |diff| {diff:.2e}")
    assert a.shape == (1, HEADS, 1, V)
    assert diff <= 1e-5
    # attention is not degenerate (else equality would prove little): the output moves with S
    assert mx.abs(e).max().item() > 1e-2


@pytest.mark.parametrize("max_score_elems", [1 << 25, 500])  # one chunk / many query chunks
def test_absorbed_prefill_equals_expanded_with_causal_mask(max_score_elems):
    m = make_mla(max_score_elems=max_score_elems)
    q_nope, q_pe, c_kv, k_pe = _inputs(m, 40, 13)  # 13 queries after 27 earlier positions
    a = m.attend_absorbed(q_nope, q_pe, c_kv, k_pe, "causal")
    e = m.attend_expanded(q_nope, q_pe, c_kv, k_pe, "causal")
    # reference: plain per-head attention with an explicit mask, no chunking
    kv = m.kv_b_proj(c_kv[:, 0]).reshape(1, 40, HEADS, -1).transpose(0, 2, 1, 3)
    k = mx.concatenate([kv[..., :NOPE], mx.broadcast_to(k_pe, (1, HEADS, 40, DR))], axis=-1)
    q = mx.concatenate([q_nope, q_pe], axis=-1)
    scores = (q @ k.swapaxes(-1, -2)) * m.scale
    visible = mx.arange(27, 40)[:, None] >= mx.arange(40)[None]
    ref = mx.softmax(mx.where(visible, scores, -mx.inf), axis=-1) @ kv[..., NOPE:]
    for name, got in (("absorbed", a), ("expanded", e)):
        diff = mx.abs(got - ref).max().item()
        print(f"budget {max_score_elems}: {name} vs naive max |diff| {diff:.2e}")
        assert diff <= 1e-5


@pytest.mark.parametrize("form", ["absorbed", "expanded", "by-cost"])
def test_cached_decode_equals_full_recompute(form):
    m = make_mla(q_lora_rank=24, max_score_elems=2000)  # small budget: chunked prefill too
    if form != "by-cost":
        m.absorb_max_len = 1 << 30 if form == "absorbed" else 0
    x = mx.random.normal((1, 30, DIM), key=mx.random.key(3))
    full = m(x, mask="causal")
    cache = LatentCache()
    pieces = [m(x[:, :9], "causal", cache), m(x[:, 9:14], "causal", cache)]
    pieces += [m(x[:, i : i + 1], None, cache) for i in range(14, 30)]
    stepped = mx.concatenate(pieces, axis=1)
    diff = mx.abs(stepped - full).max().item()
    print(f"{form}: cached vs full recompute max |diff| {diff:.2e}")
    assert cache.offset == 30
    assert diff <= 1e-5
    # trim rolls back: re-running the last 4 positions gives the same outputs
    cache.trim(4)
    again = m(x[:, 26:], "causal", cache)
    assert mx.abs(again - full[:, 26:]).max().item() <= 1e-5


def test_absorb_cost_model():
    # DeepSeek-V2(-Lite): r = 512, nope = 128, v = 128 -> 512 * 256 / (1024 - 256) = 170
    assert absorb_max_len_for(512, 128, 128) == 170
    assert absorb_max_len_for(16, 16, 16) > 1 << 20  # absorbed never costs more


def _prefill_peak(m: MLA, S: int) -> int:
    """Peak memory of a prefill that feeds ``m.max_queries(offset)`` positions per call and
    evaluates between calls (what ``generation.step.prefill`` does with a model)."""
    x = mx.random.normal((1, S, DIM), key=mx.random.key(S))
    mx.eval(x)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = LatentCache()
    while cache.offset < S:
        i = cache.offset
        n = m.max_queries(i)
        y = m(x[:, i : i + n], mask="causal" if n > 1 else None, cache=cache)
        mx.eval(y, cache.state)  # the prefill itself: outputs and the stored latent
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_prefill_memory_grows_linearly(form):
    """16 heads, S up to 4096: a [heads, S, S] float32 score tensor alone would be 1 GiB."""
    m = make_mla(heads=16, dr=16, max_score_elems=1 << 22)  # 16 MiB of scores per chunk
    m.absorb_max_len = 1 << 30 if form == "absorbed" else 0
    peaks = {S: _prefill_peak(m, S) for S in (1024, 2048, 4096)}
    full_scores = 16 * 4096 * 4096 * 4
    print(
        f"{form}: peak above inputs "
        + ", ".join(f"S={S}: {p / 2**20:.1f} MiB" for S, p in peaks.items())
        + f"; one [16, 4096, 4096] f32 score tensor: {full_scores / 2**20:.0f} MiB"
    )
    # quadratic growth would be 4x per doubling; linear plus a bounded score chunk is < 2x
    assert peaks[2048] < 2.2 * peaks[1024]
    assert peaks[4096] < 2.2 * peaks[2048]
    assert peaks[4096] < full_scores / 8


@pytest.mark.parametrize("heads, budget", [(4, 2000), (16, 1 << 22), (3, 7)])
def test_max_queries_is_the_longest_call_with_one_score_chunk(heads, budget):
    """``max_queries(offset)`` queries after ``offset`` cached positions fit one score chunk
    (``heads * L * (offset + L) <= budget``, so ``chunked_attention`` does not split them) and
    one more would not; at least one query always goes through."""
    for offset in (0, 1, 7, 100, 4095, 100_000):
        L = max_queries(heads, offset, budget)
        fits = heads * L * (offset + L) <= budget
        assert fits or L == 1, (offset, L)
        assert heads * (L + 1) * (offset + L + 1) > budget, (offset, L)
        assert L <= max(1, budget // (heads * (offset + L)))  # chunked_attention's own chunk
    m = make_mla(max_score_elems=2000)
    assert m.max_queries(27) == max_queries(HEADS, 27, 2000) == 12  # 4 * 12 * 39 = 1872
    assert m.max_queries(27, batch=2) == max_queries(HEADS, 27, 2000, batch=2)


def test_layers_and_models_never_evaluate():
    """Layers and family forwards run under ``mx.compile`` and autodiff, where evaluating
    raises; memory is bounded by the callers (prefill) instead. A plain source check."""
    import mlxllm

    root = Path(mlxllm.__file__).parent
    hits = [
        f"{path.relative_to(root)}:{i}: {line.strip()}"
        for sub in ("layers", "models")
        for path in sorted((root / sub).glob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "mx.eval(" in line or "mx.async_eval(" in line
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_chunked_layer_compiles_and_differentiates(form):
    """A layer whose attention takes query chunks runs under ``mx.compile`` and ``mx.grad``
    and computes what it computes eagerly (the chunks' evaluation used to raise there)."""
    m = make_mla(q_lora_rank=24, max_score_elems=500)
    m.absorb_max_len = 1 << 30 if form == "absorbed" else 0
    x = mx.random.normal((2, 24, DIM), key=mx.random.key(4))
    assert 500 // (2 * HEADS * 24) < 24  # several query chunks

    def loss(params, x):
        m.update(params)
        return (m(x, mask="causal") ** 2).mean()

    eager_loss, eager_grad = mx.value_and_grad(loss)(m.trainable_parameters(), x)
    compiled_loss, compiled_grad = mx.compile(mx.value_and_grad(loss))(m.trainable_parameters(), x)
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-6 * abs(eager_loss.item())
    eager, compiled = dict(tree_flatten(eager_grad)), dict(tree_flatten(compiled_grad))
    assert set(eager) == set(compiled)
    for k in eager:
        np.testing.assert_allclose(
            np.array(compiled[k]), np.array(eager[k]), rtol=1e-4, atol=1e-7, err_msg=k
        )


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_latent_cache_bytes_per_position(dtype):
    m = make_mla()
    m.set_dtype(dtype)
    cache = LatentCache()
    x = mx.random.normal((1, 300, DIM)).astype(dtype)
    m(x[:, :299], "causal", cache)
    m(x[:, 299:], None, cache)
    mx.eval(cache.state)
    assert cache.offset == 300
    # exactly the latent and the rope key per position: nothing per head
    assert cache.nbytes / cache.offset == (R + DR) * dtype.size
    assert [s.shape for s in cache.state] == [(1, 1, 300, R + DR)]


def test_v2_lite_cache_size_at_8k():
    """DeepSeek-V2-Lite config.json: 27 layers, 16 heads, kv_lora_rank 512, qk_rope_head_dim 64,
    qk_nope_head_dim 128, v_head_dim 128; bf16 (2 bytes)."""
    layers, heads, r, dr, nope, v, tokens, size = 27, 16, 512, 64, 128, 128, 8192, 2
    cache = LatentCache()
    # one layer's cache at 8K with the real widths (zeros; only the layout matters here)
    cache.update_and_fetch(
        mx.zeros((1, 1, tokens, r), mx.bfloat16), mx.zeros((1, 1, tokens, dr), mx.bfloat16)
    )
    latent = layers * cache.nbytes
    assert latent == 27 * 576 * 2 * 8192
    # mlx-lm's deepseek_v2 caches expanded per-head keys (nope + rope) and values
    expanded = layers * heads * ((nope + dr) + v) * size * tokens
    print(
        f"DeepSeek-V2-Lite KV cache at 8K tokens, bf16: latent {latent / 2**20:.0f} MiB "
        f"({latent:,} B) vs expanded (mlx-lm) {expanded / 2**20:.0f} MiB ({expanded:,} B), "
        f"{expanded / latent:.1f}x"
    )
    assert expanded / latent > 8


def test_parameter_names_are_checkpoint_names():
    names = {k for k, _ in tree_flatten(make_mla(q_lora_rank=24).parameters())}
    assert names == {
        "q_a_proj.weight",
        "q_a_layernorm.weight",
        "q_b_proj.weight",
        "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight",
        "kv_b_proj.weight",
        "o_proj.weight",
    }
    assert "q_proj.weight" in dict(tree_flatten(make_mla().parameters()))


def test_quantized_kv_b_proj_absorbed_matches_expanded():
    """The absorbed form reads kv_b_proj's weight; quantized, it must dequantize the same."""
    m = make_mla()
    nn.quantize(m, group_size=32, bits=8, class_predicate=lambda p, _: p == "kv_b_proj")
    assert isinstance(m.kv_b_proj, nn.QuantizedLinear)
    q_nope, q_pe, c_kv, k_pe = _inputs(m, 50, 1)
    a = m.attend_absorbed(q_nope, q_pe, c_kv, k_pe, None)
    e = m.attend_expanded(q_nope, q_pe, c_kv, k_pe, None)
    # the two forms round differently in the quantized matmul vs dequantize-then-matmul
    np.testing.assert_allclose(np.array(a), np.array(e), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool-2d", "additive-4d"])
def test_shared_kv_attention_equals_sdpa(mask_kind):
    """The heads-folded GEMM path of absorbed MLA == MLX's attention with the same mask."""
    from mlxllm.layers.mla import shared_kv_attention

    B, H, L, S, d, dv = 2, 4, 5, 23, 24, 16
    keys = mx.random.split(mx.random.key(7), 3)
    q = mx.random.normal((B, H, L, d), key=keys[0])
    k = mx.random.normal((B, 1, S, d), key=keys[1])
    v = mx.random.normal((B, 1, S, dv), key=keys[2])
    mask = {
        "none": None,
        "causal": "causal",
        "bool-2d": mx.arange(S)[None] % 3 != mx.arange(L)[:, None] % 3,
        "additive-4d": mx.random.normal((B, H, L, S), key=mx.random.key(8)),
    }[mask_kind]
    got = shared_kv_attention(q, k, v, 0.2, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    assert mx.abs(got - want).max().item() <= 1e-5


def test_gpu_decode_form_equals_cpu_form():
    """The fused-kernel decode used on GPUs (keys = values = [c_kv, k_pe], output cut to r)
    equals the shared-KV GEMM form used on the CPU; checked here on the CPU."""
    from mlxllm.layers.mla import shared_kv_attention

    mx.random.seed(0)
    B, H, S, r, dr = 1, 16, 300, 64, 16
    q = mx.random.normal((B, H, 1, r + dr))
    kv = mx.random.normal((B, 1, S, r + dr))
    fused = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.1)[..., :r]
    plain = shared_kv_attention(q, kv, kv[..., :r], 0.1, None)
    assert np.abs(np.array(fused) - np.array(plain)).max() < 1e-5
