"""Feed-forward blocks."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` as one fused kernel (decode is launch-bound on GPUs)."""
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def weighted_swiglu(gate: mx.array, up: mx.array, weight: mx.array) -> mx.array:
    """``silu(gate) * up * weight`` in ``gate``'s dtype, one fused kernel: a routed expert's
    weight applied to its hidden activations (``down`` is linear, so this equals weighting
    the expert's output)."""
    return (nn.silu(gate) * up * weight).astype(gate.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: Llama, Qwen, Mistral, DeepSeek experts."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
