"""Feed-forward blocks."""

import mlx.core as mx
import mlx.nn as nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: Llama, Qwen, Mistral, DeepSeek experts."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
