"""Named weight transforms shared by the loader and the converter."""

from __future__ import annotations

import mlx.core as mx


def dequant_fp8_blockwise(w: mx.array, scale_inv: mx.array, block: int = 128) -> mx.array:
    """DeepSeek-V3/R1 FP8: e4m3 bytes ``[rows, cols]``, one scale per ``block x block`` tile.

    Without it the FP8 bytes would be read as integers (uint8) and the model would be noise.

    Args:
        w: uint8 array holding float8 e4m3 values (as ``mx.load`` returns them).
        scale_inv: float scales ``[ceil(rows / block), ceil(cols / block)]``.

    Returns:
        float32 weights ``[rows, cols]``.
    """
    rows, cols = w.shape
    x = mx.from_fp8(w, dtype=mx.float32)
    s = scale_inv.astype(mx.float32)
    # expand each tile's scale over its rows and columns (edge tiles may be partial)
    s = mx.repeat(mx.repeat(s, block, axis=0)[:rows], block, axis=1)[:, :cols]
    return x * s


def dequant_fp8_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every ``X.weight`` with a ``X.weight_scale_inv`` partner by its float32 value."""
    scales = [k for k in weights if k.endswith(".weight_scale_inv")]
    if not scales:
        return weights
    out = dict(weights)
    for sk in scales:
        wk = sk[: -len("_scale_inv")]
        if wk in out:
            out[wk] = dequant_fp8_blockwise(out[wk], out.pop(sk))
    return out
