"""Absorbed MLA decode as four CUDA kernels (plus the projections), with MLX twins.

One decode step of absorbed multi-head latent attention (``layers/mla.py``), written in MLX ops,
is a dozen kernels besides the projections: RMSNorm of the latent (after a copy of the strided
slice), RoPE of ``k_pe`` and of the strided ``q_pe``, two cache writes, the ``W_UK``
absorption, the query concatenation (two copies), the attention (several kernels), slicing
``c_kv`` out of its output, ``W_UV`` and the head transpose. On MLX's CUDA backend each kernel
costs ~10 us to issue however little it computes (``moe_decode.py``), so these become:

- ``prep``: the cache row ``[rmsnorm(c_kv), rope(k_pe)]`` written in place into the cache
  buffer (no copy of the cache), and the absorbed query ``[q_nope @ W_UK, rope(q_pe)]`` per
  head, in one launch;
- ``latent_attention``: flash-decoding over the latent cache on tensor cores (split over the
  cached rows, ``mma.sync`` for ``Q K^T`` and ``P V``, two ``cp.async`` stages), then a
  combine kernel that merges the splits and applies ``W_UV`` straight into ``o_proj``'s
  layout (16-bit models, 16 heads a group: DeepSeek-V2, V2-Lite, V3);
- ``value_out``: ``W_UV`` after MLX's attention when the tensor-core kernel does not apply.

The twins are the MLX code in ``MLA`` (``latent``, ``_queries``, ``attend_absorbed``) and
``LatentCache.update_and_fetch``; ``tests/test_kernels.py`` compares both on a CUDA device.
"""

from __future__ import annotations

import mlx.core as mx

from mlxllm.kernels import FLOATS, constant, cuda_kernel, on_cuda

_PREP = r"""
    // blocks (h, chunk, b): h < H: the absorbed query of head h, 64 latent features per chunk;
    // block (H, 0, b): the cache row of batch row b, written in place into the cache buffer
    // (RMSNorm of c_kv, RoPE of k_pe) at position pos. One launch for both.
    if (blockIdx.x == H) {
        if (blockIdx.y != 0) return;
        const int b = blockIdx.z;
        const int tid = threadIdx.x;
        const float eps = params[0], rscale = params[1];
        const T* x = kv_a + (long long)b * (R + DR);
        T* row = const_cast<T*>(buf) + ((long long)b * buf_shape[2] + pos[0]) * (R + DR);
        __shared__ float red[8];
        constexpr int PER = (R + 255) / 256;
        float v[PER];
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = tid + k * 256;
            v[k] = i < R ? static_cast<float>(x[i]) : 0.f;
            ss += v[k] * v[k];
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        if ((tid & 31) == 0) red[tid >> 5] = ss;
        __syncthreads();
        float tot = 0.f;
        for (int i = 0; i < 8; ++i) tot += red[i];
        const float inv_rms = rsqrtf(tot / R + eps);
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = tid + k * 256;
            if (i < R) row[i] = static_cast<T>(v[k] * inv_rms * static_cast<float>(nw[i]));
        }
        const float p = static_cast<float>(pos[0]);
        for (int i = tid; i < DR / 2; i += 256) {
            rope_pair<TRAD, DR>(x + R, row + R, i, p, inv_freq, rscale);
        }
        return;
    }

    // block (head h, chunk of 64 latent features, batch b), 8 warps: warp w sums its eighth
    // of the NOPE inputs for the chunk (lane: 2 adjacent features, 32-bit loads), then the
    // warps' partial sums are added in shared memory
    const int h = blockIdx.x, chunk = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long qb = ((long long)b * H + h) * (NOPE + DR);
    const long long ob = ((long long)b * H + h) * (R + DR);
    __shared__ float qn[NOPE];
    __shared__ float2 part[8][32];
    for (int i = tid; i < NOPE; i += 256) qn[i] = static_cast<float>(q[qb + i]);
    __syncthreads();
    const int c = chunk * 64 + lane * 2;
    float2 a = make_float2(0.f, 0.f);
    if (c < R) {
        const T* wk = w_uk + (long long)h * NOPE * R + c;
#pragma unroll
        for (int n = warp * (NOPE / 8); n < (warp + 1) * (NOPE / 8); ++n) {
            const T* p2 = wk + (long long)n * R;
            a.x += qn[n] * static_cast<float>(p2[0]);
            a.y += qn[n] * static_cast<float>(p2[1]);
        }
    }
    part[warp][lane] = a;
    __syncthreads();
    if (warp == 0 && c < R) {
        float2 t = part[0][lane];
        for (int w = 1; w < 8; ++w) {
            t.x += part[w][lane].x;
            t.y += part[w][lane].y;
        }
        out[ob + c] = static_cast<T>(t.x);
        out[ob + c + 1] = static_cast<T>(t.y);
    }
    if (chunk == 0) {
        const float p = static_cast<float>(pos[0]);
        const float rscale = params[1];
        for (int i = tid; i < DR / 2; i += 256) {
            rope_pair<TRAD, DR>(q + qb + NOPE, out + ob + R, i, p, inv_freq, rscale);
        }
    }
"""

_VALUE = r"""
    // one warp per (head, output feature), 8 warps per block, all of one head (V % 8 == 0)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int b = blockIdx.y;
    const int row = blockIdx.x * 8 + warp;  // h * V + j
    const int h = row / V;
    __shared__ __align__(16) float os[R];
    const long long ob = ((long long)b * H + h) * (R + DR);
    for (int i = threadIdx.x; i < R; i += 256) os[i] = static_cast<float>(o[ob + i]);
    __syncthreads();
    const float a = warp_dot(w_uv + (long long)row * R, os, R, lane);
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
        and w_uk.shape[1] % 8 == 0
        and v % 8 == 0
        and dr % 2 == 0
        and r <= 8192
    )


_position: list = [None, None]


def position(offset: int) -> mx.array:
    """``offset`` as an int32 device array, made once per decode step (every layer shares it)."""
    if _position[0] != offset:
        _position[0], _position[1] = offset, mx.array([offset], mx.int32)
    return _position[1]


def prep(
    q: mx.array,
    kv_a: mx.array,
    w_uk: mx.array,
    norm_weight: mx.array,
    eps: float,
    inv_freq: mx.array,
    rope_scale: float,
    traditional: bool,
    buffer: mx.array,
    pos: mx.array,
) -> mx.array:
    """One launch for both ends of a decode step's latent attention:

    - ``kv_a[B, 1, r + dr]`` -> the cache row ``[rms_norm(c_kv) * w, rope(k_pe * rope_scale,
      pos)]`` written in place into ``buffer[B, 1, capacity, r + dr]`` at position ``pos``
      (from ``LatentCache.claim``; no copy of the cache). Twin: ``MLA.latent`` +
      ``LatentCache.update_and_fetch``.
    - returns ``q[B, 1, H * (nope + dr)]`` (the query projection) -> ``[B, H, 1, r + dr]``:
      ``[q_nope_h @ W_UK_h, rope(q_pe_h * rope_scale, pos)]``. Twin: ``MLA._queries`` then the
      absorption in ``MLA.attend_absorbed``.

    The row reaches ``buffer`` only when this kernel runs: read the buffer after it (through
    the returned query, as ``latent_attention`` does).
    """
    key = (q.shape, q.dtype, w_uk.shape, eps, rope_scale, traditional)
    launch = _prep_launches.get(key)
    if launch is None:
        B = q.shape[0]
        H, nope, r = w_uk.shape
        dr = q.shape[-1] // H - nope
        names = ["q", "w_uk", "kv_a", "nw", "inv_freq", "pos", "params", "buf"]
        kernel = cuda_kernel("mla_prep", names, ["out"], _PREP)
        kw = dict(
            template=[
                ("T", q.dtype),
                ("H", H),
                ("NOPE", nope),
                ("R", r),
                ("DR", dr),
                ("TRAD", traditional),
            ],
            grid=((H + 1) * 256, -(-r // 64), B),
            threadgroup=(256, 1, 1),
            output_shapes=[(B, H, 1, r + dr)],
            output_dtypes=[q.dtype],
        )
        launch = _prep_launches[key] = (kernel, constant(eps, rope_scale), kw)
    kernel, params, kw = launch
    (out,) = kernel(inputs=[q, w_uk, kv_a, norm_weight, inv_freq, pos, params, buffer], **kw)
    return out


_prep_launches: dict = {}  # static launch arguments per signature


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


# ---- latent flash-decoding on tensor cores -----------------------------------------------

_FLASH_HEADER = r"""
// D += A B on tensor cores: mma.sync m16n8k16, 16-bit A (16x16, row) and B (16x8, col) in
// 32-bit registers, float accumulators (raw PTX: NVRTC here has no mma.h)
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b,
                                         __nv_bfloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b, __half) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// 16 bytes global -> shared without passing through registers (cp.async, sm_80+)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem));
}
// the A fragment of a row-major 16x16 tile (ld in elements) for this lane
template <typename T>
__device__ __forceinline__ void load_a(unsigned* a, const T* p, int ld, int lane) {
    const int g = lane >> 2, c = (lane & 3) * 2;
    a[0] = *reinterpret_cast<const unsigned*>(p + g * ld + c);
    a[1] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + c);
    a[2] = *reinterpret_cast<const unsigned*>(p + g * ld + c + 8);
    a[3] = *reinterpret_cast<const unsigned*>(p + (g + 8) * ld + c + 8);
}
"""

_FLASH_PARTIAL = r"""
    // block (split, group of 16 heads, batch); 8 warps. Tiles of TK = 32 cached rows, two
    // stages in shared memory filled by cp.async (the next tile loads while this one is
    // computed); S = Q K^T and O = P V on tensor cores (mma m16n8k16, float accumulators);
    // online softmax in float32; per-split partials (acc, m, l) out.
    constexpr int W = R + DR;
    constexpr int TK = 32;
    constexpr int LD = W + 8;     // 16-bit row stride of Q / K tiles (4-bank skew per row)
    constexpr int LDS = TK + 4;   // float scores
    constexpr int LDP = TK + 8;   // 16-bit probabilities
    constexpr int KSTEPS = W / 16;
    constexpr int NB = R / 64;    // 8-feature output blocks per warp (R / 8 blocks / 8 warps)
    const int b = blockIdx.z, hg = blockIdx.y, split = blockIdx.x, nsplit = gridDim.x;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c2 = (lane & 3) * 2;
    const int S = kv_shape[2];
    const long long kvb = (long long)b * kv_strides[0];
    const long long kvs = kv_strides[2];
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);                   // [16][LD]
    T* Ks = Qs + 16 * LD;                                     // [2][TK][LD]
    float* Sf = reinterpret_cast<float*>(Ks + 2 * TK * LD);   // [2][16][LDS]
    T* Pb = reinterpret_cast<T*>(Sf + 2 * 16 * LDS);          // [16][LDP]
    float* corr_s = reinterpret_cast<float*>(Pb + 16 * LDP);  // [16]
    const unsigned short* Ku = reinterpret_cast<const unsigned short*>(Ks);

    const int n_tiles = (S + TK - 1) / TK;
    const int per = (n_tiles + nsplit - 1) / nsplit;
    const int t_begin = split * per;
    const int t_end = min(t_begin + per, n_tiles);

    for (int i = tid; i < 16 * (W / 8); i += 256) {
        const int h = i / (W / 8), c = i - h * (W / 8);
        const long long qrow = ((long long)b * H + hg * 16 + h) * W;
        cp_async16(Qs + h * LD + c * 8, q + qrow + c * 8);
    }
    auto load_tile = [&](int t, int stage) {
        const int base = t * TK;
        T* dst = Ks + stage * TK * LD;
        for (int i = tid; i < TK * (W / 8); i += 256) {
            const int j = i / (W / 8), c = i - j * (W / 8);
            if (base + j < S) cp_async16(dst + j * LD + c * 8, kv + kvb + (base + j) * kvs + c * 8);
            else reinterpret_cast<uint4*>(dst + j * LD)[c] = make_uint4(0u, 0u, 0u, 0u);
        }
    };
    if (t_begin < t_end) load_tile(t_begin, 0);
    asm volatile("cp.async.commit_group;\n" ::);

    const float sc = scale[0];
    const int sh = tid >> 4;           // softmax: this thread's head
    const int q2 = (tid & 15) * 2;     // and its 2 keys of a tile
    float acc[NB][4];
#pragma unroll
    for (int j = 0; j < NB; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m_run = NEG_INF, l_run = 0.f;

    for (int t = t_begin; t < t_end; ++t) {
        const int stage = (t - t_begin) & 1;
        const int base = t * TK;
        if (t + 1 < t_end) {
            load_tile(t + 1, stage ^ 1);
            asm volatile("cp.async.commit_group;\n" ::);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        const T* Kt = Ks + stage * TK * LD;
        {   // scores: warp -> 8 keys (warp & 3) x half of the feature steps (warp >> 2)
            float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
            const int kb = warp & 3, hf = warp >> 2;
            const int k0 = hf ? KSTEPS / 2 : 0, k1 = hf ? KSTEPS : KSTEPS / 2;
            const T* kr = Kt + (kb * 8 + g) * LD + c2;
#pragma unroll 2
            for (int ks = k0; ks < k1; ++ks) {
                unsigned a[4], bb[2];
                load_a(a, Qs + ks * 16, LD, lane);
                bb[0] = *reinterpret_cast<const unsigned*>(kr + ks * 16);
                bb[1] = *reinterpret_cast<const unsigned*>(kr + ks * 16 + 8);
                mma16816((ks - k0) & 1 ? s1 : s0, a, bb, T{});
            }
            float* sf = Sf + hf * 16 * LDS;
            const int col = kb * 8 + c2;
            sf[g * LDS + col] = s0[0] + s1[0];
            sf[g * LDS + col + 1] = s0[1] + s1[1];
            sf[(g + 8) * LDS + col] = s0[2] + s1[2];
            sf[(g + 8) * LDS + col + 1] = s0[3] + s1[3];
        }
        __syncthreads();
        {   // online softmax for head sh over this tile (16 threads per head, 2 keys each)
            float s[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int j = q2 + u;
                const float v = (Sf[sh * LDS + j] + Sf[16 * LDS + sh * LDS + j]) * sc;
                s[u] = base + j < S ? v : NEG_INF;
            }
            float mt = fmaxf(s[0], s[1]);
            for (int o = 8; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffff, mt, o));
            const float m_new = fmaxf(m_run, mt);
            const float corr = m_run == NEG_INF ? 0.f : expf(m_run - m_new);
            float ls = 0.f;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const float p = s[u] == NEG_INF ? 0.f : expf(s[u] - m_new);
                ls += p;
                Pb[sh * LDP + q2 + u] = static_cast<T>(p);
            }
            for (int o = 8; o > 0; o >>= 1) ls += __shfl_xor_sync(0xffffffff, ls, o);
            l_run = l_run * corr + ls;
            m_run = m_new;
            if ((tid & 15) == 0) corr_s[sh] = corr;
        }
        __syncthreads();
        {   // O = O * corr + P V for this warp's R / 8 features (V: the first R features)
            const float cg = corr_s[g], cg8 = corr_s[g + 8];
            const unsigned short* Kv = Ku + stage * TK * LD;
            unsigned pa[TK / 16][4];
#pragma unroll
            for (int ks = 0; ks < TK / 16; ++ks) load_a(pa[ks], Pb + ks * 16, LDP, lane);
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                acc[j][0] *= cg;
                acc[j][1] *= cg;
                acc[j][2] *= cg8;
                acc[j][3] *= cg8;
                const int f = warp * (R / 8) + j * 8 + g;
#pragma unroll
                for (int ks = 0; ks < TK / 16; ++ks) {
                    const int k0 = ks * 16 + c2;
                    unsigned bb[2];
                    bb[0] = (unsigned)Kv[k0 * LD + f] | ((unsigned)Kv[(k0 + 1) * LD + f] << 16);
                    bb[1] = (unsigned)Kv[(k0 + 8) * LD + f] |
                            ((unsigned)Kv[(k0 + 9) * LD + f] << 16);
                    mma16816(acc[j], pa[ks], bb, T{});
                }
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }

    const long long row0 = ((long long)b * nsplit + split) * H + hg * 16;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
        const int d = warp * (R / 8) + j * 8 + c2;
        *reinterpret_cast<float2*>(o_part + (row0 + g) * R + d) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(o_part + (row0 + g + 8) * R + d) =
            make_float2(acc[j][2], acc[j][3]);
    }
    if ((tid & 15) == 0) {
        ml[(row0 + sh) * 2] = m_run;
        ml[(row0 + sh) * 2 + 1] = l_run;
    }
"""

_FLASH_COMBINE = r"""
    // block (batch * head, chunk of 16 W_UV outputs), 256 threads: merge the splits' partials
    // (all R features: thread groups split the splits, float4 loads), then 16 outputs of W_UV
    constexpr int Q4 = R / 4;              // float4 columns
    constexpr int G = 256 / Q4;            // split groups
    const int bh = blockIdx.x / (V / 16), jc = blockIdx.x - bh * (V / 16);
    const int b = bh / H, h = bh - b * H;
    const int nsplit = ml_shape[1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ float wsh[256];
    __shared__ float red[8];
    __shared__ float total[2];
    __shared__ __align__(16) float4 part[G > 1 ? G : 1][Q4];
    __shared__ __align__(16) float os[R];
    float m = NEG_INF, l = 0.f;
    if (tid < nsplit) {
        const long long r = ((long long)b * nsplit + tid) * H + h;
        m = ml[r * 2];
        l = ml[r * 2 + 1];
    }
    float v = m;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (tid == 0) {
        float mm = red[0];
        for (int i = 1; i < 8; ++i) mm = fmaxf(mm, red[i]);
        total[0] = mm;
    }
    __syncthreads();
    const float M = total[0];
    const float w = m == NEG_INF ? 0.f : expf(m - M);
    wsh[tid] = w;
    v = w * l;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (tid == 0) {
        float s = 0.f;
        for (int i = 0; i < 8; ++i) s += red[i];
        total[1] = 1.f / s;
    }
    __syncthreads();
    {
        const int c = tid % Q4, grp = tid / Q4;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        if (grp < G) {
            const float4* src = reinterpret_cast<const float4*>(o_part) + c;
            const long long step = (long long)H * Q4;
            const long long r0 = ((long long)b * nsplit) * H + h;
#pragma unroll 8
            for (int s = grp; s < nsplit; s += G) {
                const float ws = wsh[s];
                const float4 x = src[(r0 + (long long)s * H) * Q4];
                o.x += ws * x.x;
                o.y += ws * x.y;
                o.z += ws * x.z;
                o.w += ws * x.w;
            }
            part[grp][c] = o;
        }
    }
    __syncthreads();
    const float inv_l = total[1];
    for (int c = tid; c < Q4; c += 256) {
        float4 o = part[0][c];
        for (int grp = 1; grp < G; ++grp) {
            const float4 x = part[grp][c];
            o.x += x.x;
            o.y += x.y;
            o.z += x.z;
            o.w += x.w;
        }
        // rounded to the model dtype, as the attention output is before W_UV
        os[4 * c] = static_cast<float>(static_cast<T>(o.x * inv_l));
        os[4 * c + 1] = static_cast<float>(static_cast<T>(o.y * inv_l));
        os[4 * c + 2] = static_cast<float>(static_cast<T>(o.z * inv_l));
        os[4 * c + 3] = static_cast<float>(static_cast<T>(o.w * inv_l));
    }
    __syncthreads();
    for (int jj = warp; jj < 16; jj += 8) {
        const int j = jc * 16 + jj;
        const float a = warp_dot(w_uv + ((long long)h * V + j) * R, os, R, lane);
        if (lane == 0) out[((long long)b * H + h) * V + j] = static_cast<T>(a);
    }
"""

_TK = 32


def flash_supported(dtype: mx.Dtype, width: int, w_uv: mx.array) -> bool:
    """Tensor-core latent attention for rows of ``width`` = r + dr: 16-bit floats, heads in
    groups of 16, 16-wide rows, a latent of 64-wide blocks (one eighth per warp) of at most
    1024 features, 16-wide values."""
    H, v, r = w_uv.shape
    return (
        on_cuda()
        and dtype in (mx.bfloat16, mx.float16)
        and w_uv.dtype == dtype
        and H % 16 == 0
        and width % 16 == 0
        and r % 64 == 0
        and 256 % (r // 4) == 0
        and v % 16 == 0
    )


def _flash_smem(W: int) -> int:
    LD, LDS, LDP = W + 8, _TK + 4, _TK + 8
    return 16 * LD * 2 + 2 * _TK * LD * 2 + 2 * 16 * LDS * 4 + 16 * LDP * 2 + 16 * 4


def latent_attention(q: mx.array, kv: mx.array, scale: float, w_uv: mx.array) -> mx.array:
    """Absorbed attention plus ``W_UV``: ``q[B, H, 1, r + dr]`` (from ``prep``) over
    ``kv[B, 1, S, r + dr]`` (the cache's ``joint``: full-width rows, possibly a view of a longer
    buffer; read through its strides, never copied) ->
    ``[B, 1, H * v]``. Twin: ``scaled_dot_product_attention(q, kv, kv)`` then ``value_out``."""
    S = kv.shape[2]
    key = (q.shape, q.dtype, kv.shape[0], kv.shape[-1], w_uv.shape, scale, _splits(q, S))
    launch = _flash_launches.get(key)
    if launch is None:
        launch = _flash_launches[key] = _flash_launch(q, kv, scale, w_uv, key[-1])
    partial, pkw, scale_c, combine, ckw = launch
    o_part, ml = partial(inputs=[q, kv, scale_c], **pkw)
    (out,) = combine(inputs=[o_part, ml, w_uv], **ckw)
    return out


_flash_launches: dict = {}  # static launch arguments per signature and split count


def _splits(q: mx.array, S: int) -> int:
    # splits of the cached rows: two blocks per SM of an H100/H200 (132 SMs; ~97 KB of shared
    # memory each), at most 256 (the combine kernel's block), at least two tiles each (the
    # second loads while the first is computed)
    return max(1, min(-(-S // (2 * _TK)), 264 // (q.shape[1] // 16), 256))


def _flash_launch(q: mx.array, kv: mx.array, scale: float, w_uv: mx.array, ns: int):
    B, H = q.shape[0], q.shape[1]
    W = kv.shape[-1]
    _, v, r = w_uv.shape
    partial = cuda_kernel(
        "mla_flash_partial",
        ["q", "kv", "scale"],
        ["o_part", "ml"],
        _FLASH_PARTIAL,
        smem=_flash_smem(W),
        contiguous=False,
        header=_FLASH_HEADER,
    )
    pkw = dict(
        template=[("T", q.dtype), ("H", H), ("R", r), ("DR", W - r)],
        grid=(ns * 256, H // 16, B),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, ns, H, r), (B, ns, H, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    combine = cuda_kernel("mla_flash_combine", ["o_part", "ml", "w_uv"], ["out"], _FLASH_COMBINE)
    ckw = dict(
        template=[("T", q.dtype), ("H", H), ("R", r), ("V", v)],
        grid=(B * H * (v // 16) * 256, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, 1, H * v)],
        output_dtypes=[q.dtype],
    )
    return partial, pkw, constant(scale), combine, ckw
