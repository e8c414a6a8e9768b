"""Quantization as a transform on a built model: ``nn.quantize`` with a predicate.

A predicate maps ``(module_path, module) -> False | {"bits", "group_size", "mode"}``; recipes
build predicates. The converter uses the same predicates per tensor, so what `convert` writes
and what ``quantize_model`` does to a model in memory always agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

Predicate = Callable[[str, nn.Module], "bool | dict"]

MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
# MX formats fix their bits and group size (mlx 0.32)
MODE_DEFAULTS = {
    "mxfp4": {"bits": 4, "group_size": 32},
    "mxfp8": {"bits": 8, "group_size": 32},
    "nvfp4": {"bits": 4, "group_size": 16},
}
RECIPES = ("uniform", "mixed_4_6")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def supported_modes() -> list[str]:
    """Quantization modes the installed MLX accepts."""
    ok = []
    w = mx.zeros((32, 64))
    for mode in MODES:
        try:
            mx.quantize(w, mode=mode, **({} if mode != "affine" else {"group_size": 64, "bits": 4}))
            ok.append(mode)
        except (ValueError, TypeError, RuntimeError):
            pass
    return ok


def is_router(path: str) -> bool:
    """MoE routers and gates stay in full precision: their logits pick experts."""
    return path.endswith((".mlp.gate", ".shared_expert_gate", ".router"))


def _quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    if not hasattr(module, "to_quantized") or is_router(path):
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and weight.shape[-1] % group_size == 0


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers where llama.cpp's Q4_K_M spends more bits: the first and last eighth, and
    every third layer in between."""
    eighth = max(1, n_layers // 8)
    return layer < eighth or layer >= n_layers - eighth or (layer - eighth) % 3 == 2


def make_predicate(
    recipe: str = "uniform",
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    n_layers: int = 0,
) -> Predicate:
    """Build a quantization predicate.

    Args:
        recipe: ``uniform`` (every quantizable layer at ``bits``) or ``mixed_4_6`` (4-bit, with
            lm_head and, in the layers Q4_K_M favours, v_proj and down_proj at 6 bits).
        bits, group_size, mode: the default setting (``mode`` may be an MX format).
        n_layers: decoder layer count (for ``mixed_4_6``).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if mode != "affine":
        bits, group_size = MODE_DEFAULTS[mode]["bits"], MODE_DEFAULTS[mode]["group_size"]
    base = {"bits": bits, "group_size": group_size, "mode": mode}

    def uniform(path: str, module: nn.Module):
        return dict(base) if _quantizable(path, module, group_size) else False

    if recipe == "uniform":
        return uniform

    high = {"bits": 6, "group_size": group_size, "mode": "affine"}

    def mixed(path: str, module: nn.Module):
        if not _quantizable(path, module, group_size):
            return False
        if path.endswith("lm_head"):
            return dict(high)
        m = _LAYER.search(path + ".")
        if m and path.endswith(("v_proj", "down_proj")) and _more_bits(int(m.group(1)), n_layers):
            return dict(high)
        return {"bits": 4, "group_size": group_size, "mode": "affine"}

    return mixed


def quantize_model(model: nn.Module, predicate: Predicate) -> dict:
    """Quantize ``model`` in place; returns the config block (defaults + per-layer overrides)."""
    chosen: dict[str, dict] = {}

    def record(path, module):
        q = predicate(path, module)
        if q:
            chosen[path] = q
        return q

    nn.quantize(model, class_predicate=record)
    return quantization_config(chosen)


def quantization_config(chosen: dict[str, dict]) -> dict:
    """The ``quantization`` block of config.json in the layout mlx-lm reads: the most common
    setting as defaults, every layer that differs listed under its path."""
    if not chosen:
        return {}
    settings = [tuple(sorted(q.items())) for q in chosen.values()]
    common = dict(max(set(settings), key=settings.count))
    block = {"group_size": common["group_size"], "bits": common["bits"], "mode": common["mode"]}
    for path, q in chosen.items():
        if q != common:
            block[path] = {"group_size": q["group_size"], "bits": q["bits"], "mode": q["mode"]}
    return block


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
        if override is False or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            keys = ("group_size", "bits", "mode")
            return {**defaults, **{k: v for k, v in override.items() if k in keys}}
        return defaults or True

    nn.quantize(model, class_predicate=predicate)


def bits_per_weight(weights: dict[str, mx.array], qconfig: dict) -> float:
    """Stored bits per parameter over the quantizable weights (packed + scales + biases).

    Parameters count as the unpacked element count; norms and biases of linear layers are
    included at their stored size.
    """
    total_bits, params = 0, 0
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            total_bits += v.nbytes * 8
            continue
        path = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and f"{path}.scales" in weights:
            q = {**{"bits": qconfig.get("bits")}, **(qconfig.get(path) or {})}
            params += v.size * 32 // q["bits"]
        else:
            params += v.size
        total_bits += v.nbytes * 8
    return total_bits / max(params, 1)
