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

from mlxllm.layers.moe import QuantizedSwitchLinear, SwitchLinear
from mlxllm.models.transforms import is_router  # routers are never quantized

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


def _affine_bpw(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Stored bits per weight: the codes plus one scale and one bias per group."""
    return bits + 2 * scale_bits / group_size


def _mixed_upgrades(model: nn.Module, group_size: int, max_bpw: float) -> set[str]:
    """Which layers a mixed 4/6 recipe lifts to 6 bits within ``max_bpw`` bits per weight.

    Candidates in the order llama.cpp's Q4_K_M favours them: the output projection (lm_head, or
    the tied embedding), then v_proj and down_proj of the "more bits" layers, outermost first.
    Each is taken while the whole model stays within the budget.
    """
    modules = [(p, m) for p, m in model.named_modules() if _quantizable(p, m, group_size)]
    size = {p: m.weight.size for p, m in modules}
    total_params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    low, high = _affine_bpw(4, group_size), _affine_bpw(6, group_size)
    bits = sum(size.values()) * low + (total_params - sum(size.values())) * 16
    n_layers = len(getattr(model, "layers", []))
    layers = sorted(
        (i for i in range(n_layers) if _more_bits(i, n_layers)),
        key=lambda i: min(i, n_layers - 1 - i),  # outermost layers first
    )
    out_proj = "lm_head" if "lm_head" in size else "model.embed_tokens"
    candidates = [out_proj] + [
        p
        for i in layers
        for p in size
        if _LAYER.search(p + ".")
        and int(_LAYER.search(p + ".").group(1)) == i
        and p.endswith(("v_proj", "down_proj"))
    ]
    chosen = set()
    for p in candidates:
        extra = size.get(p, 0) * (high - low)
        if p in size and (bits + extra) / total_params <= max_bpw:
            chosen.add(p)
            bits += extra
    return chosen


def make_predicate(
    recipe: str = "uniform",
    bits: int = 4,
    group_size: int = 64,
    mode: str = "affine",
    model: nn.Module | None = None,
    max_bpw: float = 5.0,
) -> Predicate:
    """Build a quantization predicate.

    Args:
        recipe: ``uniform`` (every quantizable layer at ``bits``) or ``mixed_4_6`` (4-bit, with
            the output projection and, in the layers Q4_K_M favours, v_proj and down_proj at 6
            bits, as far as ``max_bpw`` allows; needs ``model``).
        bits, group_size, mode: the default setting (``mode`` may be an MX format).
        model: the built (unquantized) model, for recipes that weigh layer sizes.
        max_bpw: bits-per-weight budget of the mixed recipe (16-bit scales and biases).
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
    if model is None:
        raise ValueError("the mixed_4_6 recipe needs the model to weigh its layers")
    upgraded = _mixed_upgrades(model, group_size, max_bpw)

    def mixed(path: str, module: nn.Module):
        if not _quantizable(path, module, group_size):
            return False
        return {"bits": 6 if path in upgraded else 4, "group_size": group_size, "mode": "affine"}

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


def dequantize_model(model: nn.Module, dtype: mx.Dtype = mx.float32) -> nn.Module:
    """Replace quantized layers by float layers holding the dequantized weights (in place):
    linears, embeddings and stacked experts.

    The values are exactly what the quantized layer computes with (codes x scales + biases), so
    evaluation results are unchanged up to summation order; on MLX's CPU backend the float path
    uses BLAS and is much faster for long inputs.
    """
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    replace = [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]
    for path, m in replace:
        w = mx.dequantize(
            m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode
        ).astype(dtype)
        if isinstance(m, QuantizedSwitchLinear):
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
        elif isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        else:
            new = nn.Embedding(w.shape[0], w.shape[1])
        if "bias" in m:
            new.bias = m.bias.astype(dtype)
        new.weight = w
        model.update_modules(_nested(path, new))
    return model


def _nested(path: str, module: nn.Module) -> dict:
    """``"a.b.0.c"`` -> ``{"a": {"b": [..., {"c": module}]}}`` for ``update_modules``."""
    tree: dict | list = module
    for part in reversed(path.split(".")):
        if part.isdigit():
            lst = [{}] * (int(part) + 1)
            lst[int(part)] = tree
            tree = lst
        else:
            tree = {part: tree}
    return tree
