"""The small steps around absorbed MLA decode attention as three CUDA kernels, with MLX twins.

One decode step of absorbed multi-head latent attention (``layers/mla.py``), written in MLX ops,
is a dozen kernels besides the projections and the attention itself: RMSNorm of the latent
(after a copy of the strided slice), RoPE of ``k_pe`` and of the strided ``q_pe``, two cache
writes, the ``W_UK`` absorption, the query concatenation (two copies), slicing ``c_kv`` out of
the attention output, ``W_UV`` and the head transpose. On MLX's CUDA backend each kernel costs
~10 us to issue however little it computes (``moe_decode.py``), so these become:

- ``latent_row``: ``kv_a`` output -> the cache row ``[rmsnorm(c_kv), rope(k_pe)]`` (one write);
- ``absorbed_query``: ``q_proj`` output -> ``[q_nope @ W_UK, rope(q_pe)]`` per head;
- ``value_out``: attention output ``[H, r + dr]`` -> ``o[:r] @ W_UV^T`` as ``[1, H * v]``,
  the layout ``o_proj`` takes.

The attention between them stays ``mx.fast.scaled_dot_product_attention`` over the cache's
``[c_kv, k_pe]`` buffer. The twins are the MLX code in ``MLA`` (``latent``, ``_queries``,
``attend_absorbed``); ``tests/test_kernels.py`` compares both on a CUDA device.
"""

from __future__ import annotations

import mlx.core as mx

from mlxllm.kernels import FLOATS, constant, cuda_kernel, on_cuda

_LATENT = r"""
    // one block of 256 threads per batch row: x = kv_a output [R + DR]
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    const float eps = params[0], rscale = params[1];
    const long long base = (long long)b * (R + DR);
    __shared__ float red[8];
    float ss = 0.f;
    for (int i = tid; i < R; i += 256) {
        const float v = static_cast<float>(x[base + i]);
        ss += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if ((tid & 31) == 0) red[tid >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < 8; ++i) tot += red[i];
    const float inv_rms = rsqrtf(tot / R + eps);
    for (int i = tid; i < R; i += 256) {
        const float v = static_cast<float>(x[base + i]);
        row[base + i] = static_cast<T>(v * inv_rms * static_cast<float>(w[i]));
    }
    const float p = static_cast<float>(pos[0]);
    for (int i = tid; i < DR / 2; i += 256) {
        const int i1 = TRAD ? 2 * i : i, i2 = TRAD ? 2 * i + 1 : i + DR / 2;
        const float x1 = static_cast<float>(x[base + R + i1]) * rscale;
        const float x2 = static_cast<float>(x[base + R + i2]) * rscale;
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        row[base + R + i1] = static_cast<T>(x1 * c - x2 * s);
        row[base + R + i2] = static_cast<T>(x1 * s + x2 * c);
    }
"""

_QUERY = r"""
    // block (head h, chunk of 128 latent features, batch b): q = q_proj output [H * (NOPE + DR)]
    const int h = blockIdx.x, chunk = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const long long qb = ((long long)b * H + h) * (NOPE + DR);
    const long long ob = ((long long)b * H + h) * (R + DR);
    __shared__ float qn[NOPE];
    for (int i = tid; i < NOPE; i += 128) qn[i] = static_cast<float>(q[qb + i]);
    __syncthreads();
    const int c = chunk * 128 + tid;
    if (c < R) {
        const T* wk = w_uk + (long long)h * NOPE * R + c;
        float a = 0.f;
#pragma unroll 8
        for (int n = 0; n < NOPE; ++n) a += qn[n] * static_cast<float>(wk[(long long)n * R]);
        out[ob + c] = static_cast<T>(a);
    }
    if (chunk == 0) {
        const float p = static_cast<float>(pos[0]);
        const float rscale = params[1];
        for (int i = tid; i < DR / 2; i += 128) {
            const int i1 = TRAD ? 2 * i : i, i2 = TRAD ? 2 * i + 1 : i + DR / 2;
            const float x1 = static_cast<float>(q[qb + NOPE + i1]) * rscale;
            const float x2 = static_cast<float>(q[qb + NOPE + i2]) * rscale;
            float s, c2;
            sincosf(p * inv_freq[i], &s, &c2);
            out[ob + R + i1] = static_cast<T>(x1 * c2 - x2 * s);
            out[ob + R + i2] = static_cast<T>(x1 * s + x2 * c2);
        }
    }
"""

_VALUE = r"""
    // one warp per (head, output feature), 8 warps per block, all of one head (V % 8 == 0)
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.y;
    const int row = blockIdx.x * 8 + warp;  // h * V + j
    const int h = row / V;
    __shared__ __align__(16) float os[R];
    const long long ob = ((long long)b * H + h) * (R + DR);
    for (int i = threadIdx.x; i < R; i += 256) os[i] = static_cast<float>(o[ob + i]);
    __syncthreads();
    const T* wr = w_uv + (long long)row * R;
    float a = 0.f;
    for (int c = lane; c < R / VEC; c += 32) {
        const uint4 wv = reinterpret_cast<const uint4*>(wr)[c];
        const T* wp = reinterpret_cast<const T*>(&wv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) a += os[c * VEC + v] * static_cast<float>(wp[v]);
    }
    for (int s = 16; s > 0; s >>= 1) a += __shfl_xor_sync(0xffffffff, a, s);
    if (lane == 0) out[(long long)b * H * V + row] = static_cast<T>(a);
"""


def supported(x: mx.array, w_uk: mx.array, w_uv: mx.array, dr: int) -> bool:
    """Whether the kernels run here: MLX's CUDA backend, one token, float weights of ``x``'s
    dtype, widths that 16-byte loads divide."""
    if not on_cuda():
        return False
    H, v, r = w_uv.shape
    vec = 16 // x.dtype.size
    return (
        x.shape[1] == 1
        and x.dtype in FLOATS
        and w_uk.dtype == x.dtype
        and w_uv.dtype == x.dtype
        and r % vec == 0
        and v % 8 == 0
        and dr % 2 == 0
        and r <= 8192
    )


def latent_row(
    kv_a: mx.array,
    norm_weight: mx.array,
    eps: float,
    inv_freq: mx.array,
    rope_scale: float,
    traditional: bool,
    pos: mx.array,
) -> mx.array:
    """``kv_a[B, 1, r + dr]`` -> the cache row ``[B, 1, 1, r + dr]``: ``[rms_norm(c_kv) * w,
    rope(k_pe * rope_scale, pos)]``. Twin: ``MLA.latent``."""
    B = kv_a.shape[0]
    width = kv_a.shape[-1]
    r = norm_weight.shape[0]
    (row,) = cuda_kernel(
        "mla_latent_row", ["x", "w", "inv_freq", "pos", "params"], ["row"], _LATENT
    )(
        inputs=[kv_a, norm_weight, inv_freq, pos, constant(eps, rope_scale)],
        template=[("T", kv_a.dtype), ("R", r), ("DR", width - r), ("TRAD", traditional)],
        grid=(B * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, 1, 1, width)],
        output_dtypes=[kv_a.dtype],
    )
    return row


def absorbed_query(
    q: mx.array,
    w_uk: mx.array,
    inv_freq: mx.array,
    rope_scale: float,
    traditional: bool,
    pos: mx.array,
) -> mx.array:
    """``q[B, 1, H * (nope + dr)]`` (the query projection) -> ``[B, H, 1, r + dr]``:
    ``[q_nope_h @ W_UK_h, rope(q_pe_h * rope_scale, pos)]``. Twin: ``MLA._queries`` then the
    absorption in ``MLA.attend_absorbed``."""
    B = q.shape[0]
    H, nope, r = w_uk.shape
    dr = q.shape[-1] // H - nope
    (out,) = cuda_kernel(
        "mla_absorbed_query", ["q", "w_uk", "inv_freq", "pos", "params"], ["out"], _QUERY
    )(
        inputs=[q, w_uk, inv_freq, pos, constant(0.0, rope_scale)],
        template=[
            ("T", q.dtype),
            ("H", H),
            ("NOPE", nope),
            ("R", r),
            ("DR", dr),
            ("TRAD", traditional),
        ],
        grid=(H * 128, -(-r // 128), B),
        threadgroup=(128, 1, 1),
        output_shapes=[(B, H, 1, r + dr)],
        output_dtypes=[q.dtype],
    )
    return out


def value_out(o: mx.array, w_uv: mx.array) -> mx.array:
    """Attention output ``o[B, H, 1, r + dr]`` -> ``[B, 1, H * v]``: ``o[..., :r] @ W_UV_h^T``
    per head, heads concatenated. Twin: the end of ``MLA.attend_absorbed`` and ``__call__``."""
    B = o.shape[0]
    H, v, r = w_uv.shape
    (out,) = cuda_kernel("mla_value_out", ["o", "w_uv"], ["out"], _VALUE)(
        inputs=[o, w_uv],
        template=[("T", o.dtype), ("H", H), ("V", v), ("R", r), ("DR", o.shape[-1] - r)],
        grid=(H * v // 8 * 256, B, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, 1, H * v)],
        output_dtypes=[o.dtype],
    )
    return out
