"""DeepSeek MoE decoders: DeepSeekMoE (``deepseek``), DeepSeek-V2 and V3 (one config).

- ``deepseek`` (DeepSeekMoE 16B, arXiv:2401.06066): multi-head attention, rotate-half RoPE;
  fine-grained routed experts (softmax top-k) plus always-on shared experts; the first
  ``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) are dense SwiGLU.
- ``deepseek_v2`` (arXiv:2405.04434): multi-head latent attention (``layers/mla.py``; the cache
  holds the latent, see ``cache/latent.py``), interleaved RoPE on the rope part only, YaRN with
  DeepSeek's ``mscale``/``mscale_all_dim`` and its softmax-scale correction; routing
  ``greedy`` or ``group_limited_greedy`` (experts in ``n_group`` groups, ``topk_group`` kept),
  weights times ``routed_scaling_factor``. V2-Lite has no query LoRA (``q_lora_rank = None``).
- ``deepseek_v3`` (arXiv:2412.19437): MLA as V2 (``rope_interleave`` picks interleaved or
  rotate-half RoPE), ``noaux_tc`` routing (sigmoid scores; ``e_score_correction_bias``, a
  parameter of the gate, only chooses experts), ``num_nextn_predict_layers`` multi-token
  prediction layers stored after the last decoder layer: set aside at load (``set_aside``).

Block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` with ``mlp`` dense or
``routed(x) + shared(x)``. GQA vs MLA and dense vs MoE are fields, not files.
References: HF ``transformers`` ``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py``;
DeepSeek's ``modeling_deepseek.py`` (deepseek-moe-16b) for ``moe_layer_freq``.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from mlxllm.cache import KVCache
from mlxllm.cache.latent import LatentCache
from mlxllm.errors import MlxllmError
from mlxllm.kernels.moe_decode import experts_launcher, route_supported, route_topk
from mlxllm.layers.attention import Attention
from mlxllm.layers.mla import MLA
from mlxllm.layers.mlp import SwiGLU
from mlxllm.layers.moe import SwitchGLU, group_limited_greedy, noaux_tc, softmax_topk
from mlxllm.layers.rope import RoPE, yarn_mscale
from mlxllm.models.base import BaseConfig, CausalLM, DecoderBlock
from mlxllm.models.transforms import stack_experts

ROUTERS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclasses.dataclass
class DeepseekConfig(BaseConfig):
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # MoE: layer i is routed when n_routed_experts and i >= first_k_dense_replace and
    # i % moe_layer_freq == 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 1407
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str | None = None  # greedy | group_limited_greedy | noaux_tc (V3 default)
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # MLA (kv_lora_rank set): V2 / V3
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0  # V3 multi-token prediction layers (kept aside)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.topk_method is None:
            # HF's V3 config has no topk_method; DeepSeek's own config says noaux_tc
            self.topk_method = "noaux_tc" if self.model_type == "deepseek_v3" else "greedy"
        if self.topk_method not in ROUTERS:
            raise MlxllmError(
                f"config.json: topk_method {self.topk_method!r} is not one of {', '.join(ROUTERS)}"
            )

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def mla_softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN.

        DeepSeek's correction for the longer context: without it the logits past
        ``original_max_position_embeddings`` are too flat.
        """
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        s = self.rope_scaling or {}
        if s.get("mscale_all_dim"):
            scale *= yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
        return scale


class Router(nn.Module):
    """The gate: ``weight[n_experts, dim]`` (and V3's ``e_score_correction_bias``) -> routing.

    Not an ``nn.Linear`` on purpose: quantization never touches it (routing is sensitive), and
    its logits are computed in float32 as the reference does.
    """

    def __init__(self, dim: int, c: DeepseekConfig):
        super().__init__()
        self.c = c
        self.weight = mx.zeros((c.n_routed_experts, dim))
        if c.topk_method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((c.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """``x[..., dim]`` -> ``(indices [..., k], weights [..., k] float32)``."""
        c, k = self.c, self.c.num_experts_per_tok
        if c.topk_method == "greedy" and route_supported(x, self.weight, k):
            # CUDA decode: routing in one kernel (see kernels/moe_decode.py)
            norm = c.norm_topk_prob and k > 1
            return route_topk(x, self.weight, k, norm, c.routed_scaling_factor)
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if c.topk_method == "noaux_tc":
            return noaux_tc(
                logits,
                self.e_score_correction_bias,
                k,
                c.n_group,
                c.topk_group,
                c.norm_topk_prob,
                c.routed_scaling_factor,
            )
        if c.topk_method == "group_limited_greedy":
            indices, weights = group_limited_greedy(logits, k, c.n_group, c.topk_group)
        else:
            indices, weights = softmax_topk(logits, k, norm_topk_prob=False)
        # DeepSeek's reference: renormalize when norm_topk_prob, else scale (V2 scales by 1.0
        # for 16B/Lite; deepseek-moe-16b has no scaling factor)
        if c.norm_topk_prob and k > 1:
            return indices, weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        if c.routed_scaling_factor != 1.0:
            weights = weights * c.routed_scaling_factor
        return indices, weights


class MoE(nn.Module):
    """``sum_k w_k expert_k(x) + shared_experts(x)`` (plus ``residual`` when given)."""

    adds_residual = True  # DecoderBlock passes the residual stream in (fused on CUDA)

    def __init__(self, c: DeepseekConfig):
        super().__init__()
        self.gate = Router(c.hidden_size, c)
        self.experts = SwitchGLU(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts)
        if c.n_shared_experts:
            self.shared_experts = SwiGLU(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts
            )

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        indices, weights = self.gate(x)
        shared = self.get("shared_experts")
        k = self.gate.c.num_experts_per_tok
        run = experts_launcher(x, self["experts"], shared, k, False, residual is not None)
        if run is not None:
            # CUDA decode: routed and shared experts (and the residual add) in two kernels
            return run(x, indices, weights, None, residual)
        y = self.experts(x, indices, weights)  # [..., D]
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y if residual is None else residual + y


def _attention(c: DeepseekConfig) -> nn.Module:
    if c.kv_lora_rank:
        rope = RoPE(
            c.qk_rope_head_dim,
            c.rope_theta,
            c.rope_scaling,
            # V2 always, V3 by default: pairs (x0, x1), (x2, x3) rotate together
            traditional=c.rope_interleave or c.model_type == "deepseek_v2",
        )
        return MLA(
            c.hidden_size,
            c.num_attention_heads,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            rope,
            q_lora_rank=c.q_lora_rank,
            softmax_scale=c.mla_softmax_scale,
            bias=c.attention_bias,
        )
    head_dim = c.hidden_size // c.num_attention_heads
    return Attention(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        head_dim,
        RoPE(head_dim, c.rope_theta, c.rope_scaling),
        qkv_bias=c.attention_bias,
        o_bias=c.attention_bias,
    )


def block(c: DeepseekConfig, i: int) -> DecoderBlock:
    mlp = MoE(c) if c.is_moe_layer(i) else SwiGLU(c.hidden_size, c.intermediate_size)
    return DecoderBlock(_attention(c), mlp, c.hidden_size, c.rms_norm_eps)


def join_kv_b(weights: dict, c: DeepseekConfig) -> dict:
    """Rebuild ``kv_b_proj`` from mlx-lm's split MLA layout (mlx-community DeepSeek-V3/R1).

    mlx-lm stores ``self_attn.embed_q.weight`` = ``W_UK^T`` ``[heads, r, nope]`` and
    ``self_attn.unembed_out.weight`` = ``W_UV`` ``[heads, v, r]`` (each possibly quantized along
    its last axis) instead of the checkpoint's ``kv_b_proj.weight`` ``[heads * (nope + v), r]``.
    The split parts are dequantized and joined; ``kv_b_proj`` stays in floating point (it is
    small: ``heads * (nope + v) * r`` per layer) and feeds the same absorbed/expanded paths.
    """
    parts = [k[: -len(".embed_q.weight")] for k in weights if k.endswith(".embed_q.weight")]
    for prefix in parts:
        w_uk_t = _dequantized(weights, f"{prefix}.embed_q", c.qk_nope_head_dim)  # [H, r, nope]
        w_uv = _dequantized(weights, f"{prefix}.unembed_out", c.kv_lora_rank)  # [H, v, r]
        kv_b = mx.concatenate([w_uk_t.swapaxes(-1, -2), w_uv.astype(w_uk_t.dtype)], axis=1)
        weights[f"{prefix}.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    return weights


def _dequantized(weights: dict, prefix: str, in_dims: int) -> mx.array:
    """Pop ``prefix``'s weight (and scales/biases): float, dequantized when stored packed."""
    w = weights.pop(f"{prefix}.weight")
    scales = weights.pop(f"{prefix}.scales", None)
    if scales is None:
        return w
    biases = weights.pop(f"{prefix}.biases", None)
    if biases is None:
        raise MlxllmError(
            f"{prefix} is stored in a quantization mode without biases; only affine "
            "quantization of embed_q/unembed_out is supported; convert from the original "
            "checkpoint with `mlxllm convert`"
        )
    bits = w.shape[-1] * 32 // in_dims
    group_size = in_dims // scales.shape[-1]
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


class Model(CausalLM):
    """``model(ids[B, L], cache=None) -> logits[B, L, vocab]``."""

    config_class = DeepseekConfig

    def __init__(self, config: DeepseekConfig):
        super().__init__(config, [block(config, i) for i in range(config.num_hidden_layers)])

    def new_block(self, i: int) -> DecoderBlock:
        """A fresh block of layer ``i``'s kind (an MTP module's block is one, ``i`` = the layer
        count)."""
        return block(self.config, i)

    def make_cache(self):
        """A ``LatentCache`` for MLA layers (latent + rope key only), ``KVCache`` otherwise."""
        return [LatentCache() if self.config.kv_lora_rank else KVCache() for _ in self.layers]

    def _mtp_prefixes(self) -> tuple[str, ...]:
        n = self.config.num_hidden_layers
        return tuple(
            f"model.layers.{i}." for i in range(n, n + self.config.num_nextn_predict_layers)
        )

    def sanitize(self, weights: dict) -> dict:
        # inv_freq is recomputed from the config; per-expert tensors become SwitchGLU's stacked
        # [n_experts, out, in] (MTP layers are left as stored: set_aside keeps their names)
        weights = super().sanitize(weights)
        mtp = self._mtp_prefixes()
        aside = {k: v for k, v in weights.items() if k.startswith(mtp)} if mtp else {}
        weights = stack_experts({k: v for k, v in weights.items() if k not in aside})
        return {**join_kv_b(weights, self.config), **aside}

    def set_aside(self, weights: dict) -> dict:
        """Remove V3's multi-token-prediction layers (``model.layers.{N}..``, N =
        ``num_hidden_layers``) from ``weights`` and return them under their stored names."""
        mtp = self._mtp_prefixes()
        if not mtp:
            return {}
        return {k: weights.pop(k) for k in [k for k in weights if k.startswith(mtp)]}
