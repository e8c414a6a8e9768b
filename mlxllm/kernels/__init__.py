"""Custom kernels for hot operations, each next to its pure-MLX twin.

Every kernel here has a reference implementation in plain MLX ops with the same signature; the
kernel is used only where it exists (``mx.fast.cuda_kernel`` on MLX's CUDA backend) and tests
compare the two. Everywhere else the twin runs.
"""

import mlx.core as mx

FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_HEADER = r"""
#define NEG_INF (__int_as_float(0xff800000))

// sum_i w[i] * xs[i] over n elements, 16-byte loads of w (n % (16 / sizeof(WT)) == 0), one
// warp; the result is reduced over the warp (every lane holds it)
template <typename WT>
__device__ __forceinline__ float warp_dot(const WT* w, const float* xs, int n, int lane) {
    constexpr int V = 16 / sizeof(WT);
    float acc = 0.f;
    for (int c = lane; c < n / V; c += 32) {
        const uint4 wv = reinterpret_cast<const uint4*>(w)[c];
        const WT* wp = reinterpret_cast<const WT*>(&wv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc += xs[c * V + v] * static_cast<float>(wp[v]);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    return acc;
}

// RoPE of pair i of DR features (interleaved when TRAD, else halves) at position pos, inputs
// times scale (YaRN's attention factor)
template <bool TRAD, int DR, typename TI, typename TO>
__device__ __forceinline__ void rope_pair(
    const TI* x, TO* out, int i, float pos, const float* inv_freq, float scale) {
    const int i1 = TRAD ? 2 * i : i, i2 = TRAD ? 2 * i + 1 : i + DR / 2;
    const float x1 = static_cast<float>(x[i1]) * scale, x2 = static_cast<float>(x[i2]) * scale;
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    out[i1] = static_cast<TO>(x1 * c - x2 * s);
    out[i2] = static_cast<TO>(x1 * s + x2 * c);
}
"""
_kernels: dict = {}


_constants: dict = {}


def constant(*values: float) -> mx.array:
    """A float32 array of ``values``, made once (kernel parameters, not one upload per call)."""
    if values not in _constants:
        _constants[values] = mx.array(values, mx.float32)
        mx.eval(_constants[values])
    return _constants[values]


def memo(owner, name: str, key: tuple, arrays: tuple, build):
    """``build()`` kept on ``owner`` (a module) while ``key`` compares equal and ``arrays`` are
    the same objects: weights reloaded, quantized or replaced rebuild it. What decode steps
    reuse (support checks, launch arguments) is computed once instead of once per token."""
    ids = tuple(map(id, arrays))
    got = owner.__dict__.get(name)
    if got is not None and got[0] == key and got[1] == ids:
        return got[3]
    val = build()
    owner.__dict__[name] = (key, ids, arrays, val)  # the arrays are held: ids stay theirs
    return val


def params_of(*modules) -> tuple:
    """The modules and their own arrays (identity keys for ``memo``)."""
    out = []
    for m in modules:
        if m is not None:
            out.append(m)
            out.extend(m.values())
    return tuple(out)


MAX_TOKENS = 4  # decode of a few sequences; longer inputs take the MLX ops


def decode_tokens(x: mx.array) -> bool:
    """``x[..., 1, D]`` with at most ``MAX_TOKENS`` rows: a decode step. Inputs of more than one
    position (prefill, training: the kernels have no gradient) take the MLX ops."""
    return x.ndim >= 2 and x.shape[-2] == 1 and x.size // x.shape[-1] <= MAX_TOKENS


def on_cuda() -> bool:
    """MLX's CUDA backend is the default device (the kernels here are CUDA only)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def cuda_kernel(
    name: str,
    inputs: list[str],
    outputs: list[str],
    source: str,
    smem: int = 0,
    contiguous: bool = True,
    header: str = "",
):
    """``mx.fast.cuda_kernel``, built once per (name, dynamic shared memory).

    ``contiguous=False``: inputs are passed as they are (the source reads ``<name>_strides``).
    """
    key = (name, smem)
    if key not in _kernels:
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"mlxllm_{name}",
            input_names=inputs,
            output_names=outputs,
            source=source,
            header=_HEADER + header,
            ensure_row_contiguous=contiguous,
            shared_memory=smem,
        )
    return _kernels[key]
