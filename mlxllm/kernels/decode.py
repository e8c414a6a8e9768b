"""Two generic decode fusions as CUDA kernels, with MLX twins.

- ``add_rms_norm``: the residual add of a block and the RMSNorm that follows it, one kernel
  (``h = x + a``, ``n = rms_norm(h) * w``; ``h`` is rounded to the model dtype first, as the
  separate ops do).
- ``gemv2``: two projections of the same few tokens (MLA's query and latent
  projections) in one launch: one warp per output row, 16-byte loads.

Both exist because MLX's CUDA backend spends ~10 us issuing each kernel (see
``moe_decode.py``); the twins are the plain ops (``x + a`` then ``nn.RMSNorm``; ``x @ w.T``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxllm.kernels import FLOATS, constant, cuda_kernel, decode_tokens, on_cuda

_ADD_NORM = r"""
    // one block of 256 threads per token row; each thread keeps its D / 256 sums in registers
    constexpr int PER = (D + 255) / 256;
    const long long base = (long long)blockIdx.x * D;
    const int tid = threadIdx.x;
    __shared__ float red[8];
    float hv[PER];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * 256;
        hv[k] = 0.f;
        if (i < D) {
            const T sum = static_cast<T>(static_cast<float>(x[base + i]) +
                                         static_cast<float>(a[base + i]));
            h[base + i] = sum;
            hv[k] = static_cast<float>(sum);
            ss += hv[k] * hv[k];
        }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if ((tid & 31) == 0) red[tid >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < 8; ++i) tot += red[i];
    const float inv_rms = rsqrtf(tot / D + eps[0]);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * 256;
        if (i < D) n[base + i] = static_cast<T>(hv[k] * inv_rms * static_cast<float>(w[i]));
    }
"""

_GEMV2 = r"""
    // one warp per output row over [w1; w2], 8 warps per block; token n = blockIdx.z
    const int n = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ __align__(16) float xs[D];
    for (int d = tid; d < D; d += 256) xs[d] = static_cast<float>(x[(long long)n * D + d]);
    __syncthreads();
    const int row = blockIdx.x * 8 + warp;
    if (row >= O1 + O2) return;
    const WT* w = row < O1 ? w1 + (long long)row * D : w2 + (long long)(row - O1) * D;
    const float acc = warp_dot(w, xs, D, lane);
    if (lane == 0) {
        if (row < O1) y1[(long long)n * O1 + row] = static_cast<OT>(acc);
        else y2[(long long)n * O2 + row - O1] = static_cast<OT>(acc);
    }
"""


def _on_cuda(x: mx.array) -> bool:
    return on_cuda() and decode_tokens(x) and x.dtype in FLOATS


def add_rms_norm(x: mx.array, a: mx.array, norm: nn.RMSNorm) -> tuple[mx.array, mx.array]:
    """``h = x + a`` and ``norm(h)``; one kernel for a few tokens on CUDA, else the plain ops."""
    D = x.shape[-1]
    if not (
        _on_cuda(x)
        and a.dtype == x.dtype
        and a.shape == x.shape
        and type(norm) is nn.RMSNorm
        and D <= 16384
    ):
        h = x + a
        return h, norm(h)
    N = x.size // D
    h, n = cuda_kernel("add_rms_norm", ["x", "a", "w", "eps"], ["h", "n"], _ADD_NORM)(
        inputs=[x, a, norm.weight, constant(norm.eps)],
        template=[("T", x.dtype), ("D", D)],
        grid=(N * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )
    return h, n


def gemv2_supported(x: mx.array, lin1: nn.Module, lin2: nn.Module) -> bool:
    if not _on_cuda(x):
        return False
    if any(type(m) is not nn.Linear or "bias" in m for m in (lin1, lin2)):
        return False
    w1, w2 = lin1.weight, lin2.weight
    D = x.shape[-1]
    return (
        w1.dtype == w2.dtype == x.dtype
        and w1.shape[1] == D == w2.shape[1]
        and D % (16 // w1.dtype.size) == 0
        and D <= 8192
    )


def gemv2(x: mx.array, lin1: nn.Linear, lin2: nn.Linear) -> tuple[mx.array, mx.array]:
    """``(lin1(x), lin2(x))`` for a few tokens in one launch (``gemv2_supported`` first)."""
    w1, w2 = lin1["weight"], lin2["weight"]
    key = (x.shape, x.dtype, w1.shape, w2.shape, w1.dtype)
    launch = _gemv2_launches.get(key)
    if launch is None:
        D = x.shape[-1]
        lead = x.shape[:-1]
        N = x.size // D
        o1, o2 = w1.shape[0], w2.shape[0]
        kernel = cuda_kernel("gemv2", ["x", "w1", "w2"], ["y1", "y2"], _GEMV2)
        launch = _gemv2_launches[key] = (
            kernel,
            dict(
                template=[
                    ("WT", w1.dtype),
                    ("OT", x.dtype),
                    ("D", D),
                    ("O1", o1),
                    ("O2", o2),
                ],
                grid=(-(-(o1 + o2) // 8) * 256, 1, N),
                threadgroup=(256, 1, 1),
                output_shapes=[(*lead, o1), (*lead, o2)],
                output_dtypes=[x.dtype, x.dtype],
            ),
        )
    kernel, kw = launch
    return kernel(inputs=[x, w1, w2], **kw)


_gemv2_launches: dict = {}  # static launch arguments per signature
