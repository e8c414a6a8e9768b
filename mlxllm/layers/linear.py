"""The weight matrix a linear projection computes with, whatever packs or wraps it.

Code that reads a projection's matrix instead of calling the projection (MLA folds ``kv_b_proj``
into its queries) goes through ``dense_weight``, never ``m.weight``: that attribute holds packed
codes for a quantized layer and does not exist on an adapter wrapper. The interface:

- ``nn.Linear``, ``SwitchLinear``: ``weight``;
- ``nn.QuantizedLinear``, ``QuantizedSwitchLinear``: the dequantized weight (what the layer
  multiplies by);
- a wrapper adding an update to its base (``LoRALinear``, ``LoRASwitchLinear``): its
  ``fused_weight()``, base plus update, differentiable in the adapter's parameters.

``weight_arrays`` lists the arrays that matrix is computed from: identity keys for anything
derived from it and cached (a training step, a load or a fuse gives new arrays).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllm.layers.moe import QuantizedSwitchLinear

QUANTIZED = (nn.QuantizedLinear, QuantizedSwitchLinear)


def dense_weight(linear: nn.Module) -> mx.array:
    """The float weight ``[out, in]`` (stacked experts: ``[E, out, in]``) ``linear`` computes
    with (see the module docstring for the layers that provide one)."""
    fused = getattr(type(linear), "fused_weight", None)
    if fused is not None:
        return fused(linear)
    if isinstance(linear, QUANTIZED):
        return mx.dequantize(
            linear["weight"],
            linear["scales"],
            linear.get("biases"),
            linear.group_size,
            linear.bits,
            mode=linear.mode,
        )
    return linear["weight"]


def weight_arrays(linear: nn.Module) -> tuple[mx.array, ...]:
    """Every array ``dense_weight(linear)`` depends on (frozen and trainable, an adapter's
    included)."""
    return tuple(v for _, v in tree_flatten(linear.parameters()))
