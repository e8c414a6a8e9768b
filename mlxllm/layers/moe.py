"""Mixture-of-experts building blocks: stacked experts and routers.

Experts are stored stacked, ``weight[n_experts, out, in]``, and applied with ``mx.gather_mm``
(``mx.gather_qmm`` once quantized): each token multiplies only by the experts it was routed to,
in one kernel call per projection. Prefill-sized inputs are sorted by expert first; on the CPU
backend they then take one BLAS matmul per expert instead (CPU ``gather_mm`` is a GEMV per row).
Routers are pure functions of the router logits returning
``(indices [..., k] int32, weights [..., k] float32)``; the family file applies the weights.

Router semantics follow Hugging Face transformers (``modeling_qwen2_moe.py``,
``modeling_deepseek_v2.py``, ``modeling_deepseek_v3.py``).
References: Shazeer et al. 2017 (sparsely-gated MoE); DeepSeek-V2 (arXiv:2405.04434, device-
limited routing); DeepSeek-V3 (arXiv:2412.19437, auxiliary-loss-free balancing).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxllm.layers.mlp import swiglu, weighted_swiglu

# group_size, bits that mx.quantize uses for each mode when they are not given
_QUANT_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}

# Below this many (token, expert) pairs the sort costs more than it saves (decode, short chunks).
SORT_THRESHOLD = 64


def _needs_f32(dtype: mx.Dtype) -> bool:
    # footgun: mx.gather_mm on MLX's CPU backend raises for anything but float32
    return dtype != mx.float32 and mx.default_device() == mx.cpu


class SwitchLinear(nn.Module):
    """A linear layer per expert, applied to the experts each token was routed to.

    Args:
        input_dims, output_dims: per-expert shape (``weight[n_experts, output_dims, input_dims]``).
        n_experts: number of stacked experts.
        bias: per-expert bias ``[n_experts, output_dims]``.
    """

    def __init__(self, input_dims: int, output_dims: int, n_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (n_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((n_experts, output_dims))

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """``x[*batch, M, in]`` with ``batch`` broadcastable to ``indices[*idx]`` ->
        ``[*broadcast(batch, idx), M, out]``: row block ``i`` times expert ``indices[i]``."""
        dtype = x.dtype
        w = self.weight
        if _needs_f32(dtype) or _needs_f32(w.dtype):
            x = x.astype(mx.float32)
            if indices.size < self.n_experts:
                # few pairs (decode): cast only the chosen experts, [*idx, out, in]
                y = x @ w[indices].astype(mx.float32).swapaxes(-1, -2)
            else:
                y = mx.gather_mm(x, w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=indices)
        else:
            y = mx.gather_mm(
                x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
            )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)  # [*idx, 1, out]
        return y.astype(dtype)

    def segments(self, x: mx.array, counts: list[int]) -> mx.array:
        """``x[N, in]`` grouped by expert (``counts[e]`` rows for expert ``e``) -> ``[N, out]``,
        one dense matmul per used expert (the CPU prefill path, see ``SwitchGLU``)."""
        dtype = x.dtype
        f32 = _needs_f32(dtype) or _needs_f32(self.weight.dtype)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if not c:
                continue
            xe, w = x[start : start + c], self.weight[e]
            if f32:
                xe, w = xe.astype(mx.float32), w.astype(mx.float32)
            y = xe @ w.T
            outs.append(y + self.bias[e] if "bias" in self else y)
            start += c
        return mx.concatenate(outs).astype(dtype)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode="affine"):
        """The quantized twin (what ``nn.quantize`` calls)."""
        return QuantizedSwitchLinear.from_float(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """``SwitchLinear`` with packed weights; ``weight``/``scales``/``biases`` stacked per expert
    exactly as ``mx.quantize`` lays out a 3-D weight (and as mlx-community checkpoints store them).
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        n_experts: int,
        bias: bool = False,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        super().__init__()
        dg, db = _QUANT_DEFAULTS.get(mode, (group_size, bits))
        self.group_size = group_size or dg
        self.bits = bits or db
        self.mode = mode
        w = mx.zeros((n_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(w, self.group_size, self.bits, mode=mode)
        if biases:
            self.biases = biases[0]
        if bias:
            self.bias = mx.zeros((n_experts, output_dims))
        self.freeze()

    @classmethod
    def from_float(cls, layer: SwitchLinear, group_size=None, bits=None, mode="affine"):
        n_experts, output_dims, input_dims = layer.weight.shape
        q = cls(input_dims, output_dims, n_experts, "bias" in layer, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, q.group_size, q.bits, mode=mode)
        if biases:
            q.biases = biases[0]
        if "bias" in layer:
            q.bias = layer.bias
        q.freeze()
        return q

    @property
    def n_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y

    def segments(self, x: mx.array, counts: list[int]) -> mx.array:
        """As ``SwitchLinear.segments``, for the packed weights."""
        biases = self.get("biases")
        q = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        outs, start = [], 0
        for e, c in enumerate(counts):
            if not c:
                continue
            xe, parts = x[start : start + c], (self.weight[e], self.scales[e])
            parts += (biases[e] if biases is not None else None,)
            if c >= 4:
                # CPU quantized_matmul is ~10x slower than dequantize + BLAS beyond a few rows
                w = mx.dequantize(*parts, **q).astype(mx.float32)
                y = (xe.astype(mx.float32) @ w.T).astype(x.dtype)
            else:
                y = mx.quantized_matmul(xe, *parts, transpose=True, **q)
            outs.append(y + self.bias[e] if "bias" in self else y)
            start += c
        return mx.concatenate(outs)


def _has_bias(m: nn.Module) -> bool:
    """A bias on the layer or on the base layer an adapter wraps (``linear``)."""
    return "bias" in m or ("linear" in m and "bias" in m["linear"])


def _sort_by_expert(x: mx.array, indices: mx.array):
    """Flatten ``x[N, D]``/``indices[N, k]`` into ``N * k`` rows ordered by expert.

    Returns (rows ``[N*k, 1, D]``, sorted expert ids ``[N*k]``, inverse permutation).
    """
    k, D = indices.shape[-1], x.shape[-1]
    flat = indices.flatten()
    order = mx.stop_gradient(mx.argsort(flat))
    inverse = mx.stop_gradient(mx.argsort(order))
    # footgun: the size-1 axis must come from a reshape, not from ``[:, None]``. An added axis
    # gets stride 1, and MLX-CUDA's sorted gather_mm (<= 0.32.4) takes the rows' stride from it:
    # every row but the first is read from the wrong place (Metal had the same defect before
    # 0.32.1, mlx#3960). A reshape of the contiguous gather gives that axis the stride D.
    rows = x[order // k].reshape(-1, 1, D)  # token of each (token, slot) pair, by expert
    return rows, flat[order], inverse


class SwitchGLU(nn.Module):
    """Routed SwiGLU experts: ``down_e(silu(gate_e(x)) * up_e(x))`` for each chosen expert ``e``.

    Args:
        dim: model width.
        hidden_dim: per-expert intermediate size (``moe_intermediate_size``).
        n_experts: number of routed experts.
        bias: biases on the three projections.
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, n_experts, bias)
        self.up_proj = SwitchLinear(dim, hidden_dim, n_experts, bias)
        self.down_proj = SwitchLinear(hidden_dim, dim, n_experts, bias)

    def _experts(self, x, indices, sorted_indices, weight=None):
        g = self.gate_proj(x, indices, sorted_indices)
        u = self.up_proj(x, indices, sorted_indices)
        h = swiglu(g, u) if weight is None else weighted_swiglu(g, u, weight)
        return self.down_proj(h, indices, sorted_indices)

    def _segments(self, rows: mx.array, sorted_indices: mx.array) -> mx.array | None:
        # MLX's CPU gather_mm does one GEMV per row (~1 GFLOP/s); a BLAS matmul per expert over
        # its contiguous rows is ~8x faster for a 512-token prefill. The row counts are needed on
        # the host, which evaluates the router here (one sync per MoE layer, prefill only).
        try:
            ids = np.array(sorted_indices)
        except ValueError:
            # inside mx.compile (the compiled finetune step) nothing can be read on the host:
            # None tells the caller to take gather_mm, which needs no counts
            return None
        counts = np.bincount(ids, minlength=self.gate_proj.n_experts).tolist()
        h = swiglu(self.gate_proj.segments(rows, counts), self.up_proj.segments(rows, counts))
        return self.down_proj.segments(h, counts)

    def __call__(
        self,
        x: mx.array,
        indices: mx.array,
        weights: mx.array | None = None,
        sort: bool | None = None,
    ) -> mx.array:
        """``x[..., D]``, ``indices[..., k]`` -> per-expert outputs ``[..., k, D]``, or with
        ``weights[..., k]`` their weighted sum ``[..., D]``.

        ``sort`` (default: when there are at least ``SORT_THRESHOLD`` token-expert pairs) groups
        the rows by expert first so that ``gather_mm`` reads each expert's weights once (on the
        CPU backend: one dense matmul per expert over its rows). Unsorted (decode), the weights
        scale the hidden activations inside the fused SwiGLU kernel rather than the outputs
        after ``down_proj`` (equal since ``down_proj`` is linear; not with a bias).
        """
        lead, D, k = x.shape[:-1], x.shape[-1], indices.shape[-1]
        if sort is None:
            sort = indices.size >= SORT_THRESHOLD
        if sort:
            rows, idx, inverse = _sort_by_expert(x.reshape(-1, D), indices.reshape(-1, k))
            # CPU: [N*k, D] in expert order, one matmul per expert (None under mx.compile)
            y = self._segments(rows[:, 0], idx) if mx.default_device() == mx.cpu else None
            if y is None:
                y = self._experts(rows, idx, True)  # [N*k, 1, D] in expert order
            y = y[inverse].reshape(*lead, k, D)
        elif weights is not None and not _has_bias(self.down_proj):
            # [..., D] -> [..., 1, 1, D]: one row block per token, broadcast over its k experts
            w = weights[..., None, None]  # [..., k, 1, 1]
            y = self._experts(x[..., None, None, :], indices, False, w)  # [..., k, 1, D]
            return y.sum(axis=-3).squeeze(-2)
        else:
            y = self._experts(x[..., None, None, :], indices, False).squeeze(-2)  # [..., k, D]
        if weights is None:
            return y
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


# ---- routers: logits [..., n_experts] -> (indices [..., k], weights [..., k] float32) ----


def _topk(scores: mx.array, k: int) -> mx.array:
    """Indices of the ``k`` largest scores along the last axis (unordered)."""
    # indices carry no gradient (training adapters through a MoE differentiates the gathers)
    return mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])


def softmax_topk(logits: mx.array, k: int, norm_topk_prob: bool):
    """Qwen-MoE / Mixtral / DeepSeek-V2 ``greedy``: softmax over all experts, keep the top ``k``.

    Args:
        logits: router logits ``[..., n_experts]``.
        k: experts per token.
        norm_topk_prob: renormalize the kept probabilities to sum to 1.

    Returns:
        ``(indices [..., k] int32, weights [..., k] float32)``.
    """
    scores = mx.softmax(logits.astype(mx.float32), axis=-1)
    indices = _topk(scores, k)
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return indices, weights


def _group_mask(group_scores: mx.array, topk_group: int, n_experts: int) -> mx.array:
    """bool ``[..., n_experts]``: experts that belong to the ``topk_group`` best groups."""
    n_group = group_scores.shape[-1]
    best = _topk(group_scores, topk_group)  # [..., topk_group]
    groups = mx.arange(n_group)
    keep = (best[..., None] == groups).any(axis=-2)  # [..., n_group]
    return mx.repeat(keep, n_experts // n_group, axis=-1)


def group_limited_greedy(
    logits: mx.array, k: int, n_group: int, topk_group: int, routed_scaling_factor: float = 1.0
):
    """DeepSeek-V2 device-limited routing: softmax scores; keep the ``topk_group`` groups with the
    largest single expert score; top ``k`` experts among them.

    Weights are the (unnormalized) softmax probabilities times ``routed_scaling_factor``, as
    transformers' ``DeepseekV2TopkRouter`` computes them.

    Args:
        logits: router logits ``[..., n_experts]``; ``n_experts % n_group == 0``.
        k: experts per token.
        n_group, topk_group: expert groups and how many of them a token may use.
        routed_scaling_factor: multiplies the weights.

    Returns:
        ``(indices [..., k] int32, weights [..., k] float32)``.
    """
    scores = mx.softmax(logits.astype(mx.float32), axis=-1)
    n_experts = scores.shape[-1]
    grouped = scores.reshape(*scores.shape[:-1], n_group, n_experts // n_group)
    keep = _group_mask(grouped.max(axis=-1), topk_group, n_experts)
    masked = mx.where(keep, scores, 0.0)  # HF fills dropped groups with 0, not -inf
    indices = _topk(masked, k)
    weights = mx.take_along_axis(masked, indices, axis=-1)
    if routed_scaling_factor != 1.0:  # one kernel less per layer and decode step
        weights = weights * routed_scaling_factor
    return indices, weights


def noaux_tc(
    logits: mx.array,
    e_score_correction_bias: mx.array,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
):
    """DeepSeek-V3 auxiliary-loss-free routing: sigmoid scores; the correction bias only chooses.

    Experts are chosen on ``sigmoid(logits) + bias``: a group scores the sum of its two best
    biased experts, the ``topk_group`` best groups stay, then the top ``k`` experts among them.
    Weights come from the unbiased sigmoid scores, renormalized if ``norm_topk_prob``, times
    ``routed_scaling_factor``.

    Args:
        logits: router logits ``[..., n_experts]``.
        e_score_correction_bias: ``[n_experts]`` load-balancing bias.
        k, n_group, topk_group, norm_topk_prob, routed_scaling_factor: as in the HF config.

    Returns:
        ``(indices [..., k] int32, weights [..., k] float32)``.
    """
    scores = mx.sigmoid(logits.astype(mx.float32))
    biased = scores + e_score_correction_bias.astype(mx.float32)
    n_experts = scores.shape[-1]
    grouped = biased.reshape(*biased.shape[:-1], n_group, n_experts // n_group)
    group_scores = mx.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # top-2 sum per group
    keep = _group_mask(group_scores, topk_group, n_experts)
    indices = _topk(mx.where(keep, biased, -mx.inf), k)
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return indices, weights
