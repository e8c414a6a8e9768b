"""Named weight transforms (and the router dtype rule) shared by the loader and the converter."""

from __future__ import annotations

import re

import mlx.core as mx

from mlxllm.errors import MlxllmError


def dequant_fp8_blockwise(w: mx.array, scale_inv: mx.array, block: int = 128) -> mx.array:
    """DeepSeek-V3/R1 FP8: e4m3 bytes ``[rows, cols]``, one scale per ``block x block`` tile.

    Without it the FP8 bytes would be read as integers (uint8) and the model would be noise.

    Args:
        w: uint8 array holding float8 e4m3 values (as ``mx.load`` returns them).
        scale_inv: float scales ``[ceil(rows / block), ceil(cols / block)]``.

    Returns:
        float32 weights ``[rows, cols]``.
    """
    rows, cols = w.shape
    x = mx.from_fp8(w, dtype=mx.float32)
    s = scale_inv.astype(mx.float32)
    # expand each tile's scale over its rows and columns (edge tiles may be partial)
    s = mx.repeat(mx.repeat(s, block, axis=0)[:rows], block, axis=1)[:, :cols]
    return x * s


def dequant_fp8_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every ``X.weight`` with a ``X.weight_scale_inv`` partner by its float32 value."""
    scales = [k for k in weights if k.endswith(".weight_scale_inv")]
    if not scales:
        return weights
    out = dict(weights)
    for sk in scales:
        wk = sk[: -len("_scale_inv")]
        if wk in out:
            out[wk] = dequant_fp8_blockwise(out[wk], out.pop(sk))
    return out


# MoE routers, by module path: ``mlp.gate`` (Qwen-MoE's linear, DeepSeek's ``Router`` with V3's
# ``e_score_correction_bias``), Qwen2-MoE's ``shared_expert_gate``, and ``router``. Their logits
# pick experts, and bf16 rounding or quantization error in these weights can flip a choice, so
# reference implementations keep them in float32. The one rule for the loader, the converter,
# ``fuse`` and the quantization recipes: routers are kept float32 and never quantized.
ROUTERS = (".mlp.gate", ".shared_expert_gate", ".router")
# what a router stored packed by another tool holds besides its codes: cast like any quantized
# layer's (the rule is for the float tensors a router computes with)
_PACKED = ("scales", "biases")


def is_router(path: str) -> bool:
    """Whether the module at ``path`` (``model.layers.3.mlp.gate``) is a MoE router (or gate):
    never quantized, its tensors kept float32 (``cast_weight``)."""
    return path.endswith(ROUTERS)


def cast_weight(name: str, w: mx.array, dtype: mx.Dtype) -> mx.array:
    """The checkpoint tensor ``name`` in the dtype it is stored and computed in: floating
    tensors in ``dtype``, a router's (``is_router``) in float32; integers (packed codes, MX scale
    bytes) as they are. Without the router exception bf16 rounding can flip expert choices."""
    if not mx.issubdtype(w.dtype, mx.floating):
        return w
    path, _, leaf = name.rpartition(".")
    return w.astype(mx.float32 if is_router(path) and leaf not in _PACKED else dtype)


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.(weight|bias|scales|biases)$")


def stack_experts(
    weights: dict[str, mx.array],
    n_experts: int | None = None,
    names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
) -> dict[str, mx.array]:
    """Stack per-expert ``P.experts.{e}.{name}.{param}`` into ``P.experts.{name}.{param}``.

    Without it ``SwitchLinear`` (one ``[n_experts, out, in]`` weight per projection) finds
    ``n_experts`` unexpected keys per projection and the strict load fails. ``param`` covers
    ``weight``/``bias`` and the ``scales``/``biases`` of quantized checkpoints. mlx-lm's stacked
    layout (``P.switch_mlp.{name}.{param}``) is renamed to ``P.experts.{name}.{param}``. Weights
    that are already stacked pass through unchanged.

    Args:
        weights: checkpoint tensors (lazy arrays stay lazy).
        n_experts: experts per layer, when known; every group must then hold exactly that many.
        names: the expert projections to stack; other per-expert tensors are left alone.

    Returns:
        A new dict. Raises ``MlxllmError`` when a group lacks some experts (a missing shard,
        or a caller that passes one shard at a time while a layer's experts span two).
    """
    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    out = {}
    for k, v in weights.items():
        m = _EXPERT_KEY.match(k)
        if m and m.group(3) in names:
            prefix, e, name, param = m.groups()
            groups.setdefault((prefix, name, param), {})[int(e)] = k
        elif ".switch_mlp." in k and k.split(".switch_mlp.")[1].split(".")[0] in names:
            out[k.replace(".switch_mlp.", ".experts.")] = v
        else:
            out[k] = v
    for (prefix, name, param), by_expert in groups.items():
        n = n_experts or max(by_expert) + 1
        missing = sorted(set(range(n)) - set(by_expert))
        if missing or len(by_expert) != n:
            raise MlxllmError(
                f"{prefix}.*.{name}.{param}: {len(by_expert)} of {n} experts present (missing "
                f"{missing[:4]}{'...' if len(missing) > 4 else ''}); every expert of a layer "
                "must be stacked at once"
            )
        out[f"{prefix}.{name}.{param}"] = mx.stack([weights[by_expert[e]] for e in range(n)])
    return out
