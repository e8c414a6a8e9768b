"""Qwen mixture-of-experts decoders: dense Qwen blocks whose MLP is routed over experts.

- Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B: ``qwen2_moe`` — qkv bias; every sparse MLP also runs a
  shared SwiGLU expert (``shared_expert_intermediate_size``) scaled by a sigmoid gate
  (``shared_expert_gate``, a ``dim -> 1`` linear).
- Qwen3-30B-A3B, Qwen3-235B-A22B: ``qwen3_moe`` — RMSNorm on q and k per head, explicit
  ``head_dim``, no qkv bias, no shared expert.

Both: layer ``i`` is sparse unless ``i`` is in ``mlp_only_layers`` or
``(i + 1) % decoder_sparse_step != 0`` (then a dense SwiGLU of ``intermediate_size``). The
router ``mlp.gate`` (``dim -> num_experts``, kept in float32 like ``shared_expert_gate``) picks
``num_experts_per_tok`` experts by softmax, renormalized if ``norm_topk_prob``. ``rope_scaling``
(YaRN for long context) is honoured as in the dense families.

Block: ``h = x + attn(norm(x)); out = h + moe(norm(h))`` with
``moe(x) = sum_k w_k * expert_k(x) [+ sigmoid(g . x) * shared(x)]``.
References: Qwen1.5-MoE blog (2024); Qwen2 technical report (arXiv:2407.10671); Qwen3 technical
report (arXiv:2505.09388); transformers ``modeling_qwen2_moe.py`` / ``modeling_qwen3_moe.py``.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from mlxllm.kernels.moe_decode import experts_launcher, route_supported, route_topk
from mlxllm.layers.mlp import SwiGLU
from mlxllm.layers.moe import SwitchGLU, softmax_topk
from mlxllm.models.base import BaseConfig, CausalLM, DecoderBlock
from mlxllm.models.dense import gqa_attention
from mlxllm.models.transforms import stack_experts


@dataclasses.dataclass
class MoeConfig(BaseConfig):
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    intermediate_size: int = 5632  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # qwen2_moe field (absent from older configs, which all have the bias)
    attention_bias: bool = False  # qwen3_moe field: bias on q, k, v and o
    # experts
    num_experts: int = 60
    num_local_experts: int | None = None  # transformers 5 writes qwen3_moe's num_experts so
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    shared_expert_intermediate_size: int | None = None  # qwen2_moe only

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        if self.model_type == "qwen2_moe" and self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = 5632  # Qwen2MoeConfig's default

    # Variants as fields derived from model_type (HF configs do not spell them out).
    @property
    def has_qkv_bias(self) -> bool:
        return self.qkv_bias if self.model_type == "qwen2_moe" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "qwen3_moe" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3_moe"

    @property
    def shared_expert_size(self) -> int:
        return self.shared_expert_intermediate_size if self.model_type == "qwen2_moe" else 0

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class SparseMoeBlock(nn.Module):
    """Top-k routed SwiGLU experts plus an optional sigmoid-gated shared expert (plus
    ``residual`` when given)."""

    adds_residual = True  # DecoderBlock passes the residual stream in (fused on CUDA)

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        k: int,
        norm_topk_prob: bool,
        shared_hidden_dim: int = 0,
    ):
        super().__init__()
        self.k, self.norm_topk_prob = k, norm_topk_prob
        self.gate = nn.Linear(dim, n_experts, bias=False)  # router: stays full precision
        self.experts = SwitchGLU(dim, hidden_dim, n_experts)
        if shared_hidden_dim:
            self.shared_expert = SwiGLU(dim, shared_hidden_dim)
            self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        shared = self.get("shared_expert")
        if type(self.gate) is nn.Linear and route_supported(x, self.gate.weight, self.k):
            # CUDA decode: routing in one kernel (see kernels/moe_decode.py)
            indices, weights = route_topk(x, self.gate.weight, self.k, self.norm_topk_prob)
        else:
            indices, weights = softmax_topk(self.gate(x), self.k, self.norm_topk_prob)  # [B, L, k]
        has_sw = shared is not None
        run = experts_launcher(x, self["experts"], shared, self.k, has_sw, residual is not None)
        if run is not None:
            # CUDA decode: routed and shared experts in two kernels
            gate = mx.sigmoid(self.shared_expert_gate(x)) if has_sw else None
            return run(x, indices, weights, gate, residual)
        y = self.experts(x, indices, weights)  # [B, L, D]
        if shared is not None:
            # the gate's weight is float32 (a router, see transforms.is_router): back to x's
            # dtype, or a bf16 residual stream would turn float32 from here on
            gate = mx.sigmoid(self.shared_expert_gate(x)).astype(x.dtype)
            y = y + gate * shared(x)
        return y if residual is None else residual + y


def block(c: MoeConfig, layer: int) -> DecoderBlock:
    attn = gqa_attention(c, c.has_qkv_bias)
    if c.is_sparse(layer):
        mlp = SparseMoeBlock(
            c.hidden_size,
            c.moe_intermediate_size,
            c.num_experts,
            c.num_experts_per_tok,
            c.norm_topk_prob,
            c.shared_expert_size,
        )
    else:
        mlp = SwiGLU(c.hidden_size, c.intermediate_size)
    return DecoderBlock(attn, mlp, c.hidden_size, c.rms_norm_eps)


class Model(CausalLM):
    """``model(ids[B, L], cache=None) -> logits[B, L, vocab]``."""

    config_class = MoeConfig

    def __init__(self, config: MoeConfig):
        super().__init__(config, [block(config, i) for i in range(config.num_hidden_layers)])

    def new_block(self, i: int) -> DecoderBlock:
        """A fresh block of layer ``i``'s kind (an MTP module's block is one, ``i`` = the layer
        count)."""
        return block(self.config, i)

    def sanitize(self, weights: dict) -> dict:
        # per-expert tensors become SwitchGLU's stacked [n_experts, out, in]
        return stack_experts(super().sanitize(weights), self.config.num_experts)
