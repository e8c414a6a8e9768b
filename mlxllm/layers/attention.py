"""Grouped-query attention (GQA; MHA when n_kv_heads == n_heads)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxllm.layers.rope import RoPE


class Attention(nn.Module):
    """GQA with optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3).

    Args:
        dim: model width.
        n_heads, n_kv_heads, head_dim: head layout; ``n_heads % n_kv_heads == 0``.
        rope: the RoPE module applied to q and k.
        qkv_bias / o_bias: biases on the projections.
        qk_norm_eps: if set, RMSNorm over head_dim on q and k before RoPE.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RoPE,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
        self.rope = rope

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        # [B, L, heads, head_dim] -> [B, heads, L, head_dim]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # the next position: an int, or one per row of a batch cache ([B])
        offset = cache.position if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
