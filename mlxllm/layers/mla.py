"""Multi-head latent attention (MLA): DeepSeek-V2 / V3.

Keys and values of every head are linear functions of one shared, normalized latent
``c_kv[kv_lora_rank]`` per position, plus one shared rotary key ``k_pe[qk_rope_head_dim]``:

    k_h = [W_UK_h c_kv, k_pe],  v_h = W_UV_h c_kv      (W_UK, W_UV: rows of ``kv_b_proj``)

so the cache holds only ``c_kv`` and ``k_pe`` (``LatentCache``). Attention is computed in one of
two equivalent forms, both reading that cache:

- absorbed (decode, short inputs): ``W_UK`` is folded into the query and ``W_UV`` applied after
  attention, so all heads attend over the single latent "KV head" ``[c_kv, k_pe]`` (the matrix
  is read through ``layers.linear.dense_weight``: a plain, quantized or adapted ``kv_b_proj``);
- expanded (long prefill): per-head ``k_nope``/``v`` are rebuilt from the latent by
  ``kv_b_proj`` and attention is ordinary multi-head attention.

The choice is a cost model (``absorb_max_len``): absorbed attention does more work per
(query, key) pair (``2 * kv_lora_rank + rope`` vs ``nope + rope + v``) but skips the expansion
(``kv_lora_rank * (nope + v)`` per key and head). Long inputs are processed in query chunks so
that no score tensor is larger than ``heads x chunk x S``. Nothing here evaluates (the layer runs
under ``mx.compile`` and autodiff): chunks of one lazy graph bound each tensor, not the peak, so
callers that bound memory feed at most ``MLA.max_queries(offset)`` positions per evaluated call
(generation's prefill does, through ``CausalLM.max_queries``).

References: DeepSeek-V2 (arXiv:2405.04434) section 2.1 and appendix C (absorption);
HF ``transformers/models/deepseek_v2/modeling_deepseek_v2.py`` for the parameter names.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxllm.cache.latent import LatentCache
from mlxllm.kernels import decode as decode_kernels
from mlxllm.kernels import memo, mla_decode, on_cuda, params_of
from mlxllm.layers.linear import dense_weight, weight_arrays
from mlxllm.layers.rope import RoPE

# q_a_layernorm / kv_a_layernorm use the reference's default eps, not the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


def shared_kv_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None
) -> mx.array:
    """Attention of ``n_heads`` queries over ONE shared KV head as two plain GEMMs.

    The latent "KV head" of absorbed MLA; the heads are folded into the rows so that each key
    is read once per step instead of once per head (measured on the CPU backend at S = 8192,
    V2-Lite widths: 37 ms vs 449 ms per decode step with ``scaled_dot_product_attention``,
    whose fallback reads the keys once per head).

    Args:
        q: ``[B, n_heads, L, d]``; k: ``[B, 1, S, d]``; v: ``[B, 1, S, dv]``.
        mask: ``"causal"`` (aligned to the end of the keys), ``None``, or an additive / boolean
            array ``[L, S]`` or ``[B, n_heads, L, S]``.

    Returns:
        ``[B, n_heads, L, dv]``.
    """
    B, H, L, d = q.shape
    S = k.shape[2]
    rows = (q * scale).transpose(0, 2, 1, 3).reshape(B, L * H, d)  # row l * H + h
    scores = (rows @ k[:, 0].swapaxes(-1, -2)).reshape(B, L, H, S)
    if isinstance(mask, str):
        visible = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]  # [L, S]
        scores = mx.where(visible[:, None], scores, -mx.inf)
    elif mask is not None:
        m = mask[:, None] if mask.ndim == 2 else mask.transpose(0, 2, 1, 3)  # -> [.., L, H, S]
        scores = mx.where(m, scores, -mx.inf) if m.dtype == mx.bool_ else scores + m
    p = mx.softmax(scores, axis=-1, precise=True).astype(v.dtype)
    out = p.reshape(B, L * H, S) @ v[:, 0]  # [B, L * H, dv]
    return out.reshape(B, L, H, -1).transpose(0, 2, 1, 3)


def _attention(q, k, v, scale, mask):
    if k.shape[1] == 1 and q.shape[1] > 1:
        return shared_kv_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def chunked_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: str | mx.array | None,
    max_score_elems: int,
) -> mx.array:
    """``scaled_dot_product_attention`` over query chunks of at most ``max_score_elems`` scores.

    The chunks are one lazy graph: each score tensor is bounded, but evaluated together the
    backend allocates several chunks ahead of computing them (measured on the CPU backend, 16
    heads, S = 4096, 16 MiB chunks: ~270 MiB peak vs ~60 MiB evaluating chunk by chunk). An
    evaluation here would fail under ``mx.compile``; callers that must bound peak memory pass
    queries that fit one chunk (``max_queries``) and evaluate between calls.

    Args:
        q: ``[B, n_heads, L, d]``; the queries are the last ``L`` positions of the keys.
        k, v: ``[B, n_kv_heads, S, d]`` / ``[B, n_kv_heads, S, dv]``, ``n_heads % n_kv_heads == 0``.
        scale: softmax scale.
        mask: ``"causal"`` (query ``i`` sees keys ``[0, S - L + i]``), ``None`` or an additive /
            boolean array broadcastable to ``[B, n_heads, L, S]``.
        max_score_elems: bound on ``B * n_heads * chunk * S`` (one chunk's score tensor).

    Returns:
        ``[B, n_heads, L, dv]``.
    """
    B, H, L, _ = q.shape
    S = k.shape[2]
    chunk = max(1, max_score_elems // (B * H * S))
    if L <= chunk:
        return _attention(q, k, v, scale, mask)
    outs = []
    for i0 in range(0, L, chunk):
        i1 = min(i0 + chunk, L)
        kc, vc, m = k, v, mask
        if isinstance(mask, str):
            # causal: this chunk sees no key past its last query, so drop those keys; the fused
            # causal mask then aligns the chunk to the end of the shortened key range
            end = S - L + i1
            kc, vc = k[:, :, :end], v[:, :, :end]
            m = mask if i1 - i0 > 1 else None
        elif mask is not None:
            m = mask[..., i0:i1, :] if mask.shape[-2] == L else mask
        outs.append(_attention(q[:, :, i0:i1], kc, vc, scale, m))
    return mx.concatenate(outs, axis=2)


def max_queries(n_heads: int, offset: int, max_score_elems: int, batch: int = 1) -> int:
    """Most queries ``L`` after ``offset`` cached positions whose scores fit in one chunk:
    the largest ``L >= 1`` with ``batch * n_heads * L * (offset + L) <= max_score_elems``."""
    c = max_score_elems // (batch * n_heads)
    # the positive root of L^2 + offset * L - c, rounded down (floor(floor(x) / 2) = floor(x / 2))
    return max(1, (math.isqrt(offset * offset + 4 * c) - offset) // 2)


def default_score_budget() -> int:
    """Score elements one attention chunk may hold: 2**25 (128 MiB in float32) on the CPU,
    2**30 on a GPU. A GPU runs long chunks much faster than many short ones (DeepSeek-V2-Lite
    bf16 on an H200, 8K-token prompt: 1.8 s in ~300-token chunks vs 0.7 s for mlx-lm's
    2048-token steps) and has the memory: at most 4 GiB of float32 scores per chunk."""
    return 1 << 30 if mx.default_device() == mx.gpu else 1 << 25


def absorb_max_len_for(kv_lora_rank: int, qk_nope_head_dim: int, v_head_dim: int) -> int:
    """Longest input for which the absorbed form costs fewer multiply-adds than the expanded one.

    Per (query, key, head): absorbed ``2r + dr`` vs expanded ``nope + dr + v``; the expanded form
    also pays ``r * (nope + v)`` per (key, head) to rebuild K/V. With ``L`` queries absorbed is
    cheaper while ``L * (2r - nope - v) < r * (nope + v)``; DeepSeek-V2(-Lite): L < 171.
    """
    r, extra = kv_lora_rank, 2 * kv_lora_rank - qk_nope_head_dim - v_head_dim
    if extra <= 0:
        return 1 << 30  # absorbed is never more expensive
    return (r * (qk_nope_head_dim + v_head_dim)) // extra


class MLA(nn.Module):
    """Multi-head latent attention; parameter names are the HF checkpoint's.

    Args:
        dim: model width.
        n_heads: attention heads.
        kv_lora_rank: latent width ``r`` (what the cache stores per position, with ``dr``).
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head sizes (``dr`` = rope dims).
        rope: RoPE over ``qk_rope_head_dim`` features (interleaved for DeepSeek checkpoints);
            applied to ``q_pe`` and ``k_pe`` only, since it multiplies its input by YaRN's
            attention factor.
        q_lora_rank: low-rank query (``q_a_proj -> q_a_layernorm -> q_b_proj``); ``None`` for a
            plain ``q_proj`` (DeepSeek-V2-Lite).
        softmax_scale: defaults to ``(nope + dr) ** -0.5``; DeepSeek's YaRN correction is the
            caller's (it reads the config).
        bias: bias on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (``attention_bias``).
        absorb_max_len: inputs up to this length use the absorbed form (default: by cost).
        max_score_elems: bound on one query chunk's score tensor (elements); default
            ``default_score_budget()`` for the device at call time.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope: RoPE,
        q_lora_rank: int | None = None,
        softmax_scale: float | None = None,
        bias: bool = False,
        absorb_max_len: int | None = None,
        max_score_elems: int | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = softmax_scale if softmax_scale is not None else qk_head_dim**-0.5
        if absorb_max_len is None:
            absorb_max_len = absorb_max_len_for(kv_lora_rank, qk_nope_head_dim, v_head_dim)
        self.absorb_max_len = absorb_max_len
        self.max_score_elems = max_score_elems

        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, n_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=bias)
        self.rope = rope
        # float32 [dr / 2] inverse wavelengths for the decode kernels: a lazy constant (private,
        # so not a parameter), evaluated with the first step that reads it
        self._inv_freq = (1.0 / rope._freqs).astype(mx.float32)

    def max_queries(self, offset: int, batch: int = 1) -> int:
        """Most new positions one call may take after ``offset`` cached ones with its attention
        scores in one chunk of ``max_score_elems`` (see ``chunked_attention``)."""
        return max_queries(self.n_heads, offset, self.score_budget, batch)

    @property
    def score_budget(self) -> int:
        if self.max_score_elems is not None:
            return self.max_score_elems
        return default_score_budget()

    # ---- projections -------------------------------------------------------------------------

    def _queries(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        if "q_proj" in self:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        # [B, L, heads * (nope + dr)] -> [B, heads, L, nope + dr]
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
        return q_nope, self.rope(q_pe, offset)

    def latent(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """``x[B, L, dim]`` -> latent ``c_kv[B, 1, L, r]`` (normalized), ``k_pe[B, 1, L, dr]``
        (roped)."""
        B, L, _ = x.shape
        c_kv, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        c_kv = self.kv_a_layernorm(c_kv).reshape(B, 1, L, self.kv_lora_rank)
        k_pe = k_pe.reshape(B, 1, L, self.qk_rope_head_dim)
        return c_kv, self.rope(k_pe, offset)

    def _kv_b_weights(self) -> tuple[mx.array, mx.array]:
        """``W_UK[heads, nope, r]`` and ``W_UV[heads, v, r]`` from ``kv_b_proj``, contiguous.

        Read through ``dense_weight``: a plain, quantized (dequantized here) or adapted (LoRA /
        DoRA: base plus update) ``kv_b_proj`` alike. Cached, since splitting and dequantizing on
        every decode step costs extra kernels per layer; the key is the identity of every array
        the weight comes from (an adapter's included), so loading, quantizing, fusing or a new
        adapter value recomputes it. Training traces fresh arrays each step (autodiff and
        ``mx.compile`` copy their inputs), so there it is recomputed inside the trace and the
        absorbed form is differentiable through an adapter on ``kv_b_proj``.
        """
        lin = self["kv_b_proj"]

        def build():
            w = dense_weight(lin).reshape(
                self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
            )
            w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]
            return mx.contiguous(w_uk), mx.contiguous(w_uv)

        return memo(self, "_w_ukv", (), weight_arrays(lin), build)

    # ---- the two attention forms ---------------------------------------------------------------

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, kv=None) -> mx.array:
        """Attention with ``W_UK``/``W_UV`` absorbed: one shared latent KV head.

        Args:
            q_nope ``[B, H, L, nope]``, q_pe ``[B, H, L, dr]``; c_kv ``[B, 1, S, r]``,
            k_pe ``[B, 1, S, dr]``; ``kv``: optional ``[c_kv, k_pe]`` already joined.

        Returns:
            ``[B, H, L, v]``.
        """
        w_uk, w_uv = self._kv_b_weights()
        q_lat = q_nope @ w_uk.astype(q_nope.dtype)  # [B, H, L, nope] @ [H, nope, r] -> [.., r]
        q = mx.concatenate([q_lat, q_pe], axis=-1)  # [B, H, L, r + dr]
        if kv is None:
            kv = mx.concatenate([c_kv, k_pe], axis=-1)  # [B, 1, S, r + dr]
        if q.shape[2] == 1 and q.shape[0] == 1 and mx.default_device() == mx.gpu:
            # GPU decode of one sequence: the fused kernel over the contiguous [c_kv, k_pe]
            # buffer as both keys and values (a strided c_kv view as values is ~4x slower);
            # drop the k_pe columns. A batch takes the two GEMMs below: 0.24 vs 1.11 ms at 16
            # rows of 8K (V2-Lite widths, bf16, H200; benchmarks/mla_batch_probe.py)
            o_lat = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=self.scale, mask=mask)
            o_lat = o_lat[..., : c_kv.shape[-1]]
        elif q.shape[2] == 1 and mx.default_device() == mx.gpu:
            # the joint rows as values too (a strided c_kv would be copied per layer and step)
            o_lat = shared_kv_attention(q, kv, kv, self.scale, mask)[..., : c_kv.shape[-1]]
        else:
            o_lat = chunked_attention(q, kv, c_kv, self.scale, mask, self.score_budget)
        # [B, H, L, r] @ [H, r, v] -> [B, H, L, v]
        return o_lat @ w_uv.astype(o_lat.dtype).swapaxes(-1, -2)

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask) -> mx.array:
        """Ordinary multi-head attention on per-head K/V rebuilt from the latent.

        Same arguments and result as ``attend_absorbed``.
        """
        B, H, L, _ = q_nope.shape
        S = c_kv.shape[2]
        kv = self.kv_b_proj(c_kv[:, 0])  # [B, S, H * (nope + v)]
        kv = kv.reshape(B, S, H, -1).transpose(0, 2, 1, 3)  # [B, H, S, nope + v]
        k_nope, v = mx.split(kv, [self.qk_nope_head_dim], axis=-1)
        k_pe = mx.broadcast_to(k_pe, (B, H, S, self.qk_rope_head_dim))
        k = mx.concatenate([k_nope, k_pe], axis=-1)  # [B, H, S, nope + dr]
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        return chunked_attention(q, k, v, self.scale, mask, self.score_budget)

    def _decode_flags(self, x: mx.array, w_uk, w_uv) -> tuple[bool, bool] | None:
        """Whether this decode step takes the CUDA kernels (None: no), and of them the fused
        projections and the tensor-core attention; checked once per input signature and
        weights (``kernels.memo``)."""
        first = self["q_proj"] if "q_proj" in self else self["q_a_proj"]
        kv_a_proj = self["kv_a_proj_with_mqa"]
        arrays = params_of(first, kv_a_proj) + (w_uk, w_uv)

        def build():
            if not mla_decode.supported(x, w_uk, w_uv, self.qk_rope_head_dim):
                return None
            width = self.kv_lora_rank + self.qk_rope_head_dim
            return (
                decode_kernels.gemv2_supported(x, first, kv_a_proj),
                mla_decode.flash_supported(x.dtype, width, w_uv),
            )

        key = (x.shape, x.dtype, on_cuda())
        return memo(self, "_memo_decode_flags", key, arrays, build)

    def _decode_kernels(
        self, x: mx.array, cache: LatentCache, w_uk, w_uv, fused_proj: bool, flash: bool
    ) -> mx.array:
        """One token, absorbed, with the steps around attention as CUDA kernels
        (``kernels/mla_decode.py``; the twin is the generic path of ``__call__``)."""
        first = self["q_proj"] if "q_proj" in self else self["q_a_proj"]
        kv_a_proj = self["kv_a_proj_with_mqa"]
        if fused_proj:
            q, kv_a = decode_kernels.gemv2(x, first, kv_a_proj)  # one launch
        else:
            q, kv_a = first(x), kv_a_proj(x)
        if "q_proj" not in self:
            q = self.q_b_proj(self.q_a_layernorm(q))
        r, rope = self.kv_lora_rank, self.rope
        buffer, start = cache.claim(x.shape[0], 1, r + self.qk_rope_head_dim, x.dtype, r)
        norm_kv = self["kv_a_layernorm"]
        # the cache row (written in place into the buffer) and the absorbed query: one launch
        q = mla_decode.prep(
            q,
            kv_a,
            w_uk,
            norm_kv["weight"],
            norm_kv.eps,
            self._inv_freq,
            rope.scale,
            rope.traditional,
            buffer,
            mla_decode.position(start),
        )
        # footgun: the kernel writes the row into the buffer's memory, which MLX does not
        # see; make the buffer depend on it, or evaluating only the cache's state (as prefill
        # does after a chunk of one token) would never run the kernel and lose the row
        cache.buffer = mx.depends(cache.buffer, q)
        kv = cache.joint  # [B, 1, S, r + dr], read after the write (it depends on q)
        if flash:
            # attention and W_UV in two kernels (tensor cores) instead of MLX's ~6
            return self.o_proj(mla_decode.latent_attention(q, kv, self.scale, w_uv))
        o = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=self.scale)
        return self.o_proj(mla_decode.value_out(o, w_uv))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        """``x[B, L, dim]`` -> ``[B, L, dim]``; ``cache``: a ``LatentCache`` or None."""
        B, L, _ = x.shape
        if L == 1 and isinstance(cache, LatentCache) and cache.buffer is not None:
            w_uk, w_uv = self._kv_b_weights()
            flags = self._decode_flags(x, w_uk, w_uv)
            if flags is not None and cache.buffer.dtype == x.dtype:
                return self._decode_kernels(x, cache, w_uk, w_uv, *flags)
        offset = cache.position if cache is not None else 0  # int, or [B] for a batch cache
        q_nope, q_pe = self._queries(x, offset)
        c_kv, k_pe = self.latent(x, offset)
        kv = None
        if cache is not None:
            c_kv, k_pe = cache.update_and_fetch(c_kv, k_pe)
            kv = cache.joint  # the cache's single buffer: no concatenation per decode step
        if L <= self.absorb_max_len:
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask, kv)
        else:
            o = self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
