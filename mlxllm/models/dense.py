"""Dense decoder-only transformers: Llama, Mistral, Qwen2, Qwen3 (one config, variants as fields).

- Llama 2/3/3.1 (llama3 RoPE scaling), DeepSeek-LLM 7B/67B and R1-Distill-Llama: ``llama``.
- Mistral: ``mistral`` (same graph; sliding-window attention is not applied).
- Qwen1.5/2/2.5/Coder/QwQ and R1-Distill-Qwen: ``qwen2`` — qkv bias, tied or untied embeddings,
  YaRN ``rope_scaling`` for 128K as Qwen documents.
- Qwen3: ``qwen3`` — RMSNorm on q and k per head, explicit ``head_dim``, no qkv bias.

Block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))`` (pre-norm, RMSNorm, SwiGLU, GQA).
References: Touvron et al. 2023 (Llama); Qwen2 technical report (arXiv:2407.10671); Qwen3 report.
"""

from __future__ import annotations

import dataclasses

from mlxllm.layers.attention import Attention
from mlxllm.layers.mlp import SwiGLU
from mlxllm.layers.rope import RoPE
from mlxllm.models.base import BaseConfig, CausalLM, DecoderBlock


@dataclasses.dataclass
class DenseConfig(BaseConfig):
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # llama/qwen3 field; qwen2 always has qkv bias
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # Variants as fields derived from model_type (HF configs do not spell them out).
    @property
    def qkv_bias(self) -> bool:
        if self.model_type == "qwen2":
            return True
        return self.model_type in ("llama", "qwen3") and bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.model_type in ("llama", "qwen3") and bool(self.attention_bias)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"


def gqa_attention(c, qkv_bias: bool) -> Attention:
    """The GQA attention of the Llama/Qwen families (dense and MoE) from their config fields."""
    return Attention(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        RoPE(c.head_dim, c.rope_theta, c.rope_scaling),
        qkv_bias=qkv_bias,
        o_bias=c.o_bias,
        qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
    )


def block(c: DenseConfig) -> DecoderBlock:
    mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
    return DecoderBlock(gqa_attention(c, c.qkv_bias), mlp, c.hidden_size, c.rms_norm_eps)


class Model(CausalLM):
    """``model(ids[B, L], cache=None) -> logits[B, L, vocab]``."""

    config_class = DenseConfig

    def __init__(self, config: DenseConfig):
        super().__init__(config, [block(config) for _ in range(config.num_hidden_layers)])

    def new_block(self, i: int) -> DecoderBlock:
        """A fresh block of layer ``i``'s kind (an MTP module's block is one, ``i`` = the layer
        count)."""
        return block(self.config)
