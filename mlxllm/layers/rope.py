"""Rotary position embeddings with the long-context scalings found in HF configs.

All variants are ``mx.fast.rope`` with a precomputed per-dimension wavelength table
(``freqs = 1 / inv_freq``) and, for YaRN, an attention factor that multiplies q and k (the HF
reference multiplies cos and sin; since RoPE is linear the two are equal).

References: Su et al. 2021 (RoPE); Peng et al. 2023 (YaRN, arXiv:2309.00071); Meta's Llama 3.1
``apply_scaling``; HF ``transformers.modeling_rope_utils``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlxllm.errors import MlxllmError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(dims: int, base: float) -> mx.array:
    return 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def llama3_inv_freq(dims: int, base: float, scaling: dict) -> mx.array:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, smooth in between."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    inv = _base_inv_freq(dims, base)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    scaled = mx.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return mx.where(medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_params(dims: int, base: float, scaling: dict) -> tuple[mx.array, float]:
    """YaRN: interpolate low-frequency dims by ``factor``, keep high-frequency dims, ramp between.

    Returns (inv_freq, attention_factor). ``mscale``/``mscale_all_dim`` (DeepSeek) change the
    attention factor; the softmax-scale correction that DeepSeek also applies lives in MLA.
    """
    factor = scaling["factor"]
    orig = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if m and m_all:
            attn_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
        else:
            attn_factor = yarn_mscale(factor)

    def correction_dim(n_rot):
        return dims * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dims - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - lo) / (hi - lo), 0, 1)
    extrap = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv = _base_inv_freq(dims, base)
    inv = (inv / factor) * (1 - extrap) + inv * extrap
    return inv, float(attn_factor)


class RoPE(nn.Module):
    """Rotate the first ``dims`` features of ``[B, n_heads, L, head_dim]`` by position.

    Args:
        dims: rotated feature count (head_dim, or qk_rope_head_dim for MLA).
        base: rope_theta.
        scaling: normalized rope_scaling dict with ``rope_type`` (or None).
        traditional: interleaved pairs (DeepSeek MLA) instead of rotate-half (Llama, Qwen).
    """

    def __init__(self, dims: int, base: float, scaling: dict | None = None, traditional=False):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        rope_type = (scaling or {}).get("rope_type", "default")
        self.scale = 1.0  # attention factor applied to the rotated features
        if rope_type == "default":
            inv = _base_inv_freq(dims, base)
        elif rope_type == "linear":
            inv = _base_inv_freq(dims, base) / scaling["factor"]
        elif rope_type == "llama3":
            inv = llama3_inv_freq(dims, base, scaling)
        elif rope_type == "yarn":
            inv, self.scale = yarn_params(dims, base, scaling)
        else:
            raise MlxllmError(
                f"rope_scaling type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self._freqs = 1.0 / inv  # mx.fast.rope takes wavelength-like factors, not inv_freq

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.scale != 1.0:
            x = x * self.scale
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )
