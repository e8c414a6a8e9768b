"""Quantization as a transform on a built model (``nn.quantize`` with a predicate)."""

from __future__ import annotations

import mlx.nn as nn


def quantize_from_config(model: nn.Module, qconfig: dict, weights: dict) -> None:
    """Turn the layers that the checkpoint stores quantized into quantized layers.

    ``qconfig`` is the ``quantization`` block of an MLX-layout config.json: default
    ``group_size``/``bits`` (and ``mode``), plus optional per-layer entries keyed by the module
    path holding their own settings, or ``False`` for a layer kept in full precision.
    A layer is quantized only where the checkpoint has its ``scales``.
    """
    defaults = {k: qconfig[k] for k in ("group_size", "bits", "mode") if k in qconfig}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        override = qconfig.get(path)
        if override is False:
            return False
        if f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {**defaults, **{k: override[k] for k in defaults if k in override}}
        return defaults or True

    nn.quantize(model, class_predicate=predicate)
