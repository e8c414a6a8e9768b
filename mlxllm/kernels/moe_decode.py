"""Mixture-of-experts decode in three CUDA kernels, with the MLX ops they replace as twins.

At decode a MoE layer is a few token rows against many small weight matrices. Written in MLX
ops it is ~20 kernels per layer (router: cast, GEMV, softmax, argpartition, gathers; experts:
three ``gather_mm``, SwiGLU, weighted sum; shared experts: three GEMVs, SwiGLU, add), and on
MLX's CUDA backend each kernel costs ~10 us to issue whatever it computes (measured on an H200
with CUPTI: for DeepSeek-V2-Lite at 8K context the GPU is busy for half of the step, the rest
is dispatch). These kernels do the same in three:

- ``route_topk``: router logits (float32 weights), softmax over experts, top-``k`` by repeated
  arg-max, renormalized or scaled weights. One block per token.
- ``experts_up``: for each routed expert slot and each shared-expert chunk, ``gate`` and ``up``
  rows against the token (one warp per row, 16-byte loads), ``silu(g) * u * slot_weight``.
  Shared experts are split into ``moe_intermediate_size``-wide chunks, each a slot of weight 1
  (or Qwen's sigmoid gate), so they ride in the same launch.
- ``experts_down``: each output feature sums the ``down`` rows of every slot against that
  slot's activations (held in shared memory): routed and shared outputs, already added, and
  the block's residual.

Float experts and affine 4/8-bit quantized ones (codes unpacked in the kernel) alike.
``experts_launcher`` checks and prepares a layer's launches once per input signature.

The twins are the MLX code paths in ``layers/moe.py`` (``softmax_topk``, ``SwitchGLU``,
``SwiGLU``); ``tests/test_kernels.py`` compares them on a CUDA device.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from mlxllm.kernels import FLOATS, constant, cuda_kernel, decode_tokens, memo, on_cuda, params_of

_ROUTE = r"""
    // one block of 1024 threads per token
    const int n = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ __align__(16) float xs[D];
    __shared__ float probs[E];
    for (int d = tid; d < D; d += 1024) xs[d] = static_cast<float>(x[(long long)n * D + d]);
    __syncthreads();
    for (int e = warp; e < E; e += 32) {
        const float a = warp_dot(wr + (long long)e * D, xs, D, lane);  // 16-byte loads
        if (lane == 0) probs[e] = a;
    }
    __syncthreads();
    if (warp != 0) return;
    float m = NEG_INF;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, probs[e]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float s = 0.f;
    for (int e = lane; e < E; e += 32) {
        const float p = expf(probs[e] - m);
        probs[e] = p;  // each lane only touches its own experts e = lane (mod 32)
        s += p;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const float inv = 1.f / s;
    float chosen[K];
    float total = 0.f;
    for (int k = 0; k < K; ++k) {
        float best = -1.f;
        int bi = 0x7fffffff;
        for (int e = lane; e < E; e += 32) {
            const float p = probs[e];
            if (p > best) { best = p; bi = e; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffff, best, o);
            const int oi = __shfl_xor_sync(0xffffffff, bi, o);
            if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
        }
        if (lane == (bi & 31)) probs[bi] = -1.f;  // taken
        chosen[k] = best * inv;
        total += chosen[k];
        if (lane == 0) idx[(long long)n * K + k] = bi;
    }
    if (lane == 0) {
        const float f = NORM ? 1.f / (total + 1e-20f) : scale[0];
        for (int k = 0; k < K; ++k) wts[(long long)n * K + k] = chosen[k] * f;
    }
"""

_UP = r"""
    // one warp per (slot, row); 8 warps per block
    const int n = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ __align__(16) float xs[D];
    for (int d = threadIdx.x; d < D; d += 256) xs[d] = static_cast<float>(x[(long long)n * D + d]);
    __syncthreads();
    const int row = blockIdx.x * 8 + warp;
    if (row >= (K + S) * I) return;
    const int slot = row / I, j = row - slot * I;
    const WT* g;
    const WT* u;
    if (slot < K) {
        const long long e = idx[(long long)n * K + slot];
        g = wg + (e * I + j) * D;
        u = wu + (e * I + j) * D;
    } else {
        const long long r = (long long)(slot - K) * I + j;
        g = sg + r * D;
        u = su + r * D;
    }
    const float ag = warp_dot(g, xs, D, lane), au = warp_dot(u, xs, D, lane);
    if (lane == 0) {
        const float act = ag / (1.f + expf(-ag));
        const float w = slot < K ? wts[(long long)n * K + slot] : sw[n];
        h[((long long)n * (K + S) + slot) * I + j] = act * au * w;
    }
"""

_DOWN = r"""
    // one warp per output feature; 8 warps per block; the token's activations in shared memory
    const int n = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* hs = reinterpret_cast<float*>(smem_raw);  // [(K + S) * I]
    const float* hn = h + (long long)n * (K + S) * I;
    for (int i = threadIdx.x; i < (K + S) * I; i += 256) hs[i] = hn[i];
    __syncthreads();
    const int d = blockIdx.x * 8 + warp;
    if (d >= D) return;
    float acc = 0.f;
    for (int slot = 0; slot < K + S; ++slot) {
        const WT* w = slot < K
            ? wd + ((long long)idx[(long long)n * K + slot] * D + d) * I
            : sd + (long long)d * (S * I) + (long long)(slot - K) * I;
        acc += warp_dot(w, hs + slot * I, I, lane);
    }
    if (lane == 0) {
        const long long o = (long long)n * D + d;
        // as the separate ops round: the MoE output in OT, then the residual add
        y[o] = HAS_RES ? static_cast<OT>(static_cast<float>(res[o]) +
                                         static_cast<float>(static_cast<OT>(acc)))
                       : static_cast<OT>(acc);
    }
"""


def cuda_available() -> bool:
    return on_cuda()


def route_supported(x: mx.array, weight: mx.array, k: int) -> bool:
    E, D = weight.shape
    return (
        cuda_available()
        and decode_tokens(x)
        and E <= 1024
        and D <= 8192
        and D % (16 // weight.dtype.size) == 0
        and k <= min(E, 32)
        and x.dtype in FLOATS
        and weight.dtype in FLOATS
    )


def route_topk(
    x: mx.array, weight: mx.array, k: int, norm_topk_prob: bool, scale: float = 1.0
) -> tuple[mx.array, mx.array]:
    """Softmax top-``k`` routing in one kernel.

    Args:
        x: ``[..., D]`` tokens; weight: router ``[E, D]`` (logits computed in float32).
        k: experts per token.
        norm_topk_prob: renormalize the kept probabilities (else multiply them by ``scale``).

    Returns:
        ``(indices [..., k] int32, weights [..., k] float32)``, experts in descending order.
        Twin: ``layers.moe.softmax_topk`` on ``x @ weight.T`` (same set, any order).
    """
    key = (x.shape, x.dtype, weight.shape, weight.dtype, k, bool(norm_topk_prob), scale)
    launch = _route_launches.get(key)
    if launch is None:
        E, D = weight.shape
        lead = x.shape[:-1]
        N = x.size // D
        kernel = cuda_kernel("route_topk", ["x", "wr", "scale"], ["idx", "wts"], _ROUTE)
        launch = _route_launches[key] = (
            kernel,
            constant(scale),
            dict(
                template=[
                    ("T", x.dtype),
                    ("WT", weight.dtype),
                    ("D", D),
                    ("E", E),
                    ("K", k),
                    ("NORM", bool(norm_topk_prob)),
                ],
                grid=(N * 1024, 1, 1),
                threadgroup=(1024, 1, 1),
                output_shapes=[(*lead, k), (*lead, k)],
                output_dtypes=[mx.int32, mx.float32],
            ),
        )
    kernel, scale_c, kw = launch
    idx, wts = kernel(inputs=[x, weight, scale_c], **kw)
    return idx, wts


_route_launches: dict = {}  # static launch arguments per input signature


def experts_supported(x: mx.array, experts, shared) -> bool:
    """Whether ``fused_experts`` runs here: CUDA, a few tokens, plain float stacked weights
    (no quantization, bias or adapter), widths a multiple of one 16-byte load."""
    from mlxllm.layers.moe import SwitchLinear

    if not cuda_available() or not decode_tokens(x):
        return False
    projs = [experts.gate_proj, experts.up_proj, experts.down_proj]
    if any(type(p) is not SwitchLinear or "bias" in p for p in projs):
        return False
    dtype = experts.gate_proj.weight.dtype
    E, hid, D = experts.gate_proj.weight.shape
    v = 16 // dtype.size
    ok = dtype in FLOATS and x.dtype in FLOATS and D % v == 0 and hid % v == 0 and D <= 8192
    if shared is not None:
        import mlx.nn as nn

        sp = [shared.gate_proj, shared.up_proj, shared.down_proj]
        ok = ok and all(type(p) is nn.Linear and "bias" not in p for p in sp)
        ok = ok and all(p.weight.dtype == dtype for p in sp)
        ok = ok and shared.gate_proj.weight.shape[0] % hid == 0
    return ok


def fused_experts(
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    experts,
    shared=None,
    shared_weight: mx.array | None = None,
    residual: mx.array | None = None,
) -> mx.array:
    """``sum_k weights_k * expert_{indices_k}(x) + shared_weight * shared(x)`` in two kernels.

    Args:
        x: ``[..., D]``; indices / weights: ``[..., k]`` (int32 / float32).
        experts: a ``SwitchGLU`` (float weights ``[E, I, D]`` / ``[E, D, I]``, or affine 4/8-bit
            quantized ones: ``experts_supported`` or ``quantized_experts_supported`` first).
        shared: an optional ``SwiGLU`` whose width is a multiple of ``I``.
        shared_weight: ``[..., 1]`` multiplier of the shared output (Qwen's sigmoid gate);
            default 1.
        residual: ``[..., D]`` added to the result (the block's residual stream), if given.

    Returns:
        ``[..., D]`` in ``x``'s dtype. Twin: ``SwitchGLU(x, indices, weights) + shared(x)``.
    """
    run = experts_launcher(
        x, experts, shared, indices.shape[-1], shared_weight is not None, residual is not None
    )
    return run(x, indices, weights, shared_weight, residual)


def _run_experts(launch, x, indices, weights, shared_weight=None, residual=None) -> mx.array:
    up, up_kw, up_w, down, down_kw, down_w, sw = launch
    if shared_weight is not None:
        sw = shared_weight
        if sw.dtype != mx.float32:
            sw = sw.astype(mx.float32)
    idx = indices if indices.dtype == mx.int32 else indices.astype(mx.int32)
    wts = weights if weights.dtype == mx.float32 else weights.astype(mx.float32)
    (h,) = up(inputs=[x, idx, wts, sw, *up_w], **up_kw)
    res = x if residual is None else residual
    if res.dtype != x.dtype:
        res = res.astype(x.dtype)
    (y,) = down(inputs=[h, idx, *down_w, res], **down_kw)
    return y


def _experts_launch(x: mx.array, k: int, experts, shared, has_res: bool):
    """What ``fused_experts`` passes to its two kernels besides the per-token inputs."""
    E, hid, D = experts.gate_proj.weight.shape
    lead = x.shape[:-1]
    N = x.size // D
    wdt = experts.gate_proj.weight.dtype
    if shared is not None:
        S = shared.gate_proj.weight.shape[0] // hid
        sg, su, sd = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
    else:
        S = 0
        sg = su = sd = experts.gate_proj.weight  # not read
    tmpl = [("WT", wdt), ("D", D), ("I", hid), ("K", k), ("S", S)]
    rows = (k + S) * hid
    names = ["x", "idx", "wts", "sw", "wg", "wu", "sg", "su"]
    up = cuda_kernel("experts_up", names, ["h"], _UP)
    up_kw = dict(
        template=tmpl,
        grid=(-(-rows // 8) * 256, 1, N),
        threadgroup=(256, 1, 1),
        output_shapes=[(*lead, k + S, hid)],
        output_dtypes=[mx.float32],
    )
    smem = (k + S) * hid * 4
    down = cuda_kernel("experts_down", ["h", "idx", "wd", "sd", "res"], ["y"], _DOWN, smem)
    down_kw = dict(
        template=[("OT", x.dtype), *tmpl, ("HAS_RES", has_res)],
        grid=(-(-D // 8) * 256, 1, N),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    sw = constant(*([1.0] * N))  # shared experts at weight 1 (unless a weight is passed)
    up_w = [experts.gate_proj.weight, experts.up_proj.weight, sg, su]
    return up, up_kw, up_w, down, down_kw, [experts.down_proj.weight, sd], sw


# ---- affine-quantized experts --------------------------------------------------------------
# Packed codes ``uint32 [rows, in * BITS / 32]`` (value j of a word in bits [BITS*j, BITS*j +
# BITS)), ``scales`` / ``biases`` ``[rows, in / GS]``: w = scale * q + bias per group. One
# 16-byte load holds EPC = 128 / BITS codes, all in one group (GS % EPC == 0), so a chunk adds
# scale * sum(x * q) + bias * sum(x).

_QDOT = r"""
template <int BITS, int GS, int IN, typename ST>
__device__ __forceinline__ float qdot(const unsigned int* w, const ST* s, const ST* b,
                                      const float* xs, int lane) {
    constexpr int EPC = 128 / BITS;
    constexpr int PER = 32 / BITS;
    constexpr unsigned int MASK = (1u << BITS) - 1u;
    float acc = 0.f;
    for (int c = lane; c < IN / EPC; c += 32) {
        const uint4 wv = reinterpret_cast<const uint4*>(w)[c];
        const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
        const float* xc = xs + c * EPC;
        float xq = 0.f, xsum = 0.f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
#pragma unroll
            for (int j = 0; j < PER; ++j) {
                const float xv = xc[k * PER + j];
                xq += xv * static_cast<float>((words[k] >> (BITS * j)) & MASK);
                xsum += xv;
            }
        }
        const int g = (c * EPC) / GS;
        acc += static_cast<float>(s[g]) * xq + static_cast<float>(b[g]) * xsum;
    }
    return acc;
}
"""

_UP_Q = r"""
    constexpr int WPR = D * BITS / 32;  // words per row
    constexpr int GPR = D / GS;         // groups per row
    const int n = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ __align__(16) float xs[D];
    for (int d = threadIdx.x; d < D; d += 256) xs[d] = static_cast<float>(x[(long long)n * D + d]);
    __syncthreads();
    const int row = blockIdx.x * 8 + warp;
    if (row >= (K + S) * I) return;
    const int slot = row / I, j = row - slot * I;
    float ag, au;
    if (slot < K) {
        const long long r = (long long)idx[(long long)n * K + slot] * I + j;
        ag = qdot<BITS, GS, D>(wg + r * WPR, wgs + r * GPR, wgb + r * GPR, xs, lane);
        au = qdot<BITS, GS, D>(wu + r * WPR, wus + r * GPR, wub + r * GPR, xs, lane);
    } else {
        const long long r = (long long)(slot - K) * I + j;
        ag = qdot<BITS, GS, D>(sg + r * WPR, sgs + r * GPR, sgb + r * GPR, xs, lane);
        au = qdot<BITS, GS, D>(su + r * WPR, sus + r * GPR, sub + r * GPR, xs, lane);
    }
    for (int o = 16; o > 0; o >>= 1) {
        ag += __shfl_xor_sync(0xffffffff, ag, o);
        au += __shfl_xor_sync(0xffffffff, au, o);
    }
    if (lane == 0) {
        const float act = ag / (1.f + expf(-ag));
        const float w = slot < K ? wts[(long long)n * K + slot] : sw[n];
        h[((long long)n * (K + S) + slot) * I + j] = act * au * w;
    }
"""

_DOWN_Q = r"""
    constexpr int WPR = I * BITS / 32;       // words per routed row (input width I)
    constexpr int GPR = I / GS;
    constexpr int SWPR = S * I * BITS / 32;  // shared down rows are S * I wide
    constexpr int SGPR = S * I / GS;
    const int n = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* hs = reinterpret_cast<float*>(smem_raw);
    const float* hn = h + (long long)n * (K + S) * I;
    for (int i = threadIdx.x; i < (K + S) * I; i += 256) hs[i] = hn[i];
    __syncthreads();
    const int d = blockIdx.x * 8 + warp;
    if (d >= D) return;
    float acc = 0.f;
    for (int slot = 0; slot < K; ++slot) {
        const long long r = (long long)idx[(long long)n * K + slot] * D + d;
        acc += qdot<BITS, GS, I>(wd + r * WPR, wds + r * GPR, wdb + r * GPR, hs + slot * I, lane);
    }
    for (int s = 0; s < S; ++s) {
        const long long w0 = (long long)d * SWPR + (long long)s * I * BITS / 32;
        const long long g0 = (long long)d * SGPR + (long long)s * I / GS;
        acc += qdot<BITS, GS, I>(sd + w0, sds + g0, sdb + g0, hs + (K + s) * I, lane);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) {
        const long long o = (long long)n * D + d;
        y[o] = HAS_RES ? static_cast<OT>(static_cast<float>(res[o]) +
                                         static_cast<float>(static_cast<OT>(acc)))
                       : static_cast<OT>(acc);
    }
"""


def quantized_experts_supported(x: mx.array, experts, shared) -> bool:
    """``fused_experts`` runs here on quantized experts: CUDA, a few tokens, affine 4/8-bit
    experts (and shared experts with the same settings), group boundaries on 16-byte loads."""
    import mlx.nn as nn

    from mlxllm.layers.moe import QuantizedSwitchLinear

    if not cuda_available() or not decode_tokens(x) or x.dtype not in FLOATS:
        return False
    projs = [experts.gate_proj, experts.up_proj, experts.down_proj]
    if any(type(p) is not QuantizedSwitchLinear or "bias" in p for p in projs):
        return False
    g = experts.gate_proj
    bits, gs = g.bits, g.group_size
    if g.mode != "affine" or bits not in (4, 8) or gs not in (32, 64, 128):
        return False
    if any((p.bits, p.group_size, p.mode) != (bits, gs, "affine") for p in projs):
        return False
    hid, D = g.scales.shape[1], x.shape[-1]
    epc = 128 // bits
    ok = D % gs == 0 and hid % gs == 0 and gs % epc == 0 and D <= 8192
    if shared is not None:
        sp = [shared.gate_proj, shared.up_proj, shared.down_proj]
        ok = ok and all(type(p) is nn.QuantizedLinear and "bias" not in p for p in sp)
        ok = ok and all((p.bits, p.group_size, p.mode) == (bits, gs, "affine") for p in sp)
        ok = ok and shared.gate_proj.scales.shape[0] % hid == 0
    return ok


def _qexperts_launch(x: mx.array, k: int, experts, shared, has_res: bool):
    """``_experts_launch`` for affine-quantized experts."""
    g, u, dn = experts.gate_proj, experts.up_proj, experts.down_proj
    hid, D = g.scales.shape[1], x.shape[-1]
    lead = x.shape[:-1]
    N = x.size // D
    if shared is not None:
        S = shared.gate_proj.scales.shape[0] // hid
        sparts = [shared.gate_proj, shared.up_proj, shared.down_proj]
    else:
        S = 0
        sparts = [g, u, dn]  # not read
    tmpl = [("BITS", g.bits), ("GS", g.group_size), ("D", D), ("I", hid), ("K", k), ("S", S)]
    tmpl.append(("ST", g.scales.dtype))  # part of the kernel's name: one build per scale dtype
    rows = (k + S) * hid

    def parts(m):
        return [m.weight, m.scales, m["biases"]]

    up_names = ["x", "idx", "wts", "sw", "wg", "wgs", "wgb", "wu", "wus", "wub"]
    up_names += ["sg", "sgs", "sgb", "su", "sus", "sub"]
    up = cuda_kernel("experts_up_q", up_names, ["h"], _UP_Q, header=_QDOT)
    up_kw = dict(
        template=tmpl,
        grid=(-(-rows // 8) * 256, 1, N),
        threadgroup=(256, 1, 1),
        output_shapes=[(*lead, k + S, hid)],
        output_dtypes=[mx.float32],
    )
    down_names = ["h", "idx", "wd", "wds", "wdb", "sd", "sds", "sdb", "res"]
    smem = (k + S) * hid * 4
    down = cuda_kernel("experts_down_q", down_names, ["y"], _DOWN_Q, smem, header=_QDOT)
    down_kw = dict(
        template=[("OT", x.dtype), *tmpl, ("HAS_RES", has_res)],
        grid=(-(-D // 8) * 256, 1, N),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    sw = constant(*([1.0] * N))
    up_w = parts(g) + parts(u) + parts(sparts[0]) + parts(sparts[1])
    return up, up_kw, up_w, down, down_kw, parts(dn) + parts(sparts[2]), sw


def experts_launcher(x: mx.array, experts, shared, k: int, has_sw: bool, has_res: bool):
    """``run(x, indices, weights, shared_weight, residual)``: routed + shared experts (and the
    residual add) in two kernels for float or affine-quantized experts, or None (then the MLX
    path). Checked and prepared once per input signature and weights."""
    if not cuda_available() or not decode_tokens(x):
        return None
    gp, up, dp = experts["gate_proj"], experts["up_proj"], experts["down_proj"]
    sp = () if shared is None else (shared["gate_proj"], shared["up_proj"], shared["down_proj"])
    arrays = params_of(experts, shared, gp, up, dp, *sp)

    def build():
        if experts_supported(x, experts, shared):
            launch = _experts_launch(x, k, experts, shared, has_res)
        elif quantized_experts_supported(x, experts, shared):
            launch = _qexperts_launch(x, k, experts, shared, has_res)
        else:
            return None
        return functools.partial(_run_experts, launch)

    key = (x.shape, x.dtype, k, has_sw, has_res)
    return memo(experts, "_memo_launcher", key, arrays, build)
