"""LoRA and DoRA adapters as transforms on a built model.

``LoRALinear.from_base(linear)`` wraps an ``nn.Linear`` or an ``nn.QuantizedLinear`` (QLoRA: the
quantized base stays frozen and packed) and adds a low-rank update::

    y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b      lora_a: [in, r], lora_b: [r, out]

``lora_b`` starts at zero, so a fresh adapter computes exactly what the base computes.
``LoRASwitchLinear`` does the same for stacked experts (``SwitchLinear`` and its quantized twin):
one ``lora_a[e]``/``lora_b[e]`` pair per expert, applied with ``gather_mm`` to the experts each
token was routed to.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) splits
the adapted weight into a magnitude and a direction,
``W' = m * (W + s (A B)^T) / ||W + s (A B)^T||``, with the norm taken per output row and ``m``
initialised to ``||W||`` (again equal to the base at init).

``apply_lora(model, ...)`` freezes the model and wraps the target projections of the last
``num_layers`` blocks, so only adapter parameters are trainable. ``fuse_model`` merges adapters
back into plain (or re-quantized) linears; ``save_adapter``/``load_adapter`` read and write
``adapters.safetensors`` + ``adapter_config.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxllm.errors import MlxllmError
from mlxllm.layers.linear import QUANTIZED, dense_weight
from mlxllm.layers.moe import QuantizedSwitchLinear, SwitchLinear, _needs_f32

# Attention projections of GQA blocks: the usual LoRA choice, small and effective.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def _dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a plain or quantized linear (or stacked experts)."""
    out_dims, packed = linear.weight.shape[-2:]
    if isinstance(linear, QUANTIZED):
        return packed * 32 // linear.bits, out_dims
    return packed, out_dims


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update (optionally DoRA)."""

    @classmethod
    def from_base(
        cls,
        linear: nn.Module,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
        dora: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear`` (``nn.Linear`` or ``nn.QuantizedLinear``).

        Args:
            linear: the base layer; it is frozen and kept as ``self.linear``.
            rank: rank ``r`` of the update.
            scale: multiplier of the update (PEFT's ``alpha / r``).
            dropout: dropout on the adapter's input, in training mode only.
            dora: also learn a per-output magnitude (DoRA).
        """
        in_dims, out_dims = _dims(linear)
        lora = cls(in_dims, out_dims, rank, scale, dropout)
        linear.freeze()
        lora.linear = linear
        if dora:
            lora.magnitude = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)
        return lora

    def __init__(
        self, input_dims: int, output_dims: int, rank: int, scale: float, dropout: float = 0.0
    ):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    @property
    def dora(self) -> bool:
        return "magnitude" in self

    def _delta(self) -> mx.array:
        """The update ``[out, in]`` in the base weight's layout."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        y = y + (self.scale * z).astype(y.dtype)
        if not self.dora:
            return y
        # DoRA: rescale the adapted output per output row; the bias is added after the rescale
        bias = self.linear.get("bias")
        if bias is not None:
            y = y - bias
        w = dense_weight(self.linear).astype(mx.float32) + self._delta()
        factor = self.magnitude / mx.linalg.norm(w, axis=1)  # [out]
        y = y * factor.astype(y.dtype)
        return y + bias if bias is not None else y

    def fused_weight(self) -> mx.array:
        """Base weight with the adapter merged, float32 ``[out, in]``: this layer computes
        ``x @ w.T`` (bias and dropout aside), and code that reads the matrix sees it through
        ``layers.linear.dense_weight``."""
        w = dense_weight(self.linear).astype(mx.float32) + self._delta()
        if self.dora:
            w = (self.magnitude / mx.linalg.norm(w, axis=1))[:, None] * w
        return w

    def fuse(self, dequantize: bool = False, dtype: mx.Dtype | None = None) -> nn.Module:
        """A plain layer computing base + adapter: ``nn.Linear``, or ``nn.QuantizedLinear`` with
        the base's settings when the base was quantized (unless ``dequantize``)."""
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        if dtype is None:
            dtype = base.scales.dtype if quantized else base.weight.dtype
        w = self.fused_weight().astype(dtype)
        out_dims, in_dims = w.shape
        bias = base.get("bias")
        fused = nn.Linear(in_dims, out_dims, bias=bias is not None)
        fused.weight = w
        if bias is not None:
            fused.bias = bias
        if quantized and not dequantize:
            fused = nn.QuantizedLinear.from_linear(
                fused, group_size=base.group_size, bits=base.bits, mode=base.mode
            )
        return fused


class LoRASwitchLinear(nn.Module):
    """Frozen stacked experts plus a trainable low-rank update per expert.

    ``y_e = base_e(x) + scale * (dropout(x) @ lora_a[e]) @ lora_b[e]`` for each routed expert
    ``e``; ``lora_a: [E, in, r]``, ``lora_b: [E, r, out]`` (zero at start).
    """

    @classmethod
    def from_base(
        cls, switch: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0
    ) -> LoRASwitchLinear:
        in_dims, out_dims = _dims(switch)
        switch.freeze()
        return cls(switch, in_dims, out_dims, switch.weight.shape[0], rank, scale, dropout)

    def __init__(self, base, input_dims, output_dims, n_experts, rank, scale, dropout=0.0):
        super().__init__()
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (n_experts, input_dims, rank))
        self.lora_b = mx.zeros((n_experts, rank, output_dims))

    @property
    def n_experts(self) -> int:
        return self.lora_a.shape[0]

    def _lora(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        dtype = mx.float32 if _needs_f32(x.dtype) else x.dtype  # CPU gather_mm: float32 only
        x = self.dropout(x).astype(dtype)
        a, b = self.lora_a.astype(dtype), self.lora_b.astype(dtype)
        z = mx.gather_mm(x, a, rhs_indices=indices, sorted_indices=sorted_indices)
        return mx.gather_mm(z, b, rhs_indices=indices, sorted_indices=sorted_indices)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices)
        z = self._lora(x, indices, sorted_indices)
        return y + (self.scale * z).astype(y.dtype)

    def segments(self, x: mx.array, counts: list[int]) -> mx.array:
        """The CPU prefill path (rows grouped by expert), see ``SwitchLinear.segments``."""
        y = self.linear.segments(x, counts)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                xe = self.dropout(x[start : start + c]).astype(mx.float32)
                outs.append((xe @ self.lora_a[e].astype(mx.float32)) @ self.lora_b[e])
                start += c
        return y + (self.scale * mx.concatenate(outs)).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """Stacked base weights with the adapters merged, float32 ``[E, out, in]``."""
        w = dense_weight(self.linear)
        delta = self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32))
        return w.astype(mx.float32) + delta.swapaxes(-1, -2)

    def fuse(self, dequantize: bool = False, dtype: mx.Dtype | None = None) -> nn.Module:
        base = self.linear
        quantized = isinstance(base, QuantizedSwitchLinear)
        if dtype is None:
            dtype = base.scales.dtype if quantized else base.weight.dtype
        w = self.fused_weight().astype(dtype)
        n_experts, out_dims, in_dims = w.shape
        fused = SwitchLinear(in_dims, out_dims, n_experts, bias="bias" in base)
        fused.weight = w
        if "bias" in base:
            fused.bias = base.bias
        if quantized and not dequantize:
            fused = QuantizedSwitchLinear.from_float(fused, base.group_size, base.bits, base.mode)
        return fused


def _wrap(m: nn.Module, rank: int, scale: float, dropout: float, dora: bool, path: str):
    if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
        return LoRALinear.from_base(m, rank, scale, dropout, dora)
    if dora:
        raise MlxllmError(
            f"DoRA is not supported on stacked experts ({path}); drop --dora or leave the "
            "expert projections out of the targets"
        )
    return LoRASwitchLinear.from_base(m, rank, scale, dropout)


def _target_layers(model: nn.Module, num_layers: int | None) -> list[tuple[int, nn.Module]]:
    layers = list(model.layers)
    if num_layers is not None and num_layers <= 0:
        raise MlxllmError(f"num_layers must be positive, got {num_layers}")
    start = 0 if num_layers is None else max(0, len(layers) - num_layers)
    return [(i, layers[i]) for i in range(start, len(layers))]


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    num_layers: int | None = None,
    dora: bool = False,
) -> nn.Module:
    """Freeze ``model`` and wrap the target linears of its last ``num_layers`` blocks in place
    (stacked experts too: ``gate_proj``/``up_proj``/``down_proj`` of a MoE block).

    Args:
        model: a built ``CausalLM`` (float or quantized).
        rank, scale, dropout, dora: see ``LoRALinear.from_base``.
        targets: last path components of the linears to adapt (``q_proj``, ``down_proj``, ...).
        num_layers: adapt only the last N blocks (None: all).

    Returns:
        ``model``, with only adapter parameters trainable.
    """
    model.freeze()
    found = 0
    for _, block in _target_layers(model, num_layers):
        adaptable = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
        swaps = [
            (path, _wrap(m, rank, scale, dropout, dora, path))
            for path, m in block.named_modules()
            if path.rsplit(".", 1)[-1] in targets and isinstance(m, adaptable)
        ]
        if swaps:
            block.update_modules(tree_unflatten(swaps))
        found += len(swaps)
    if not found:
        raise MlxllmError(
            f"no linear layer named {', '.join(targets)} in this model; choose other targets"
        )
    object.__setattr__(
        model,
        "adapter_config",
        dict(
            rank=rank,
            scale=scale,
            dropout=dropout,
            targets=list(targets),
            num_layers=num_layers,
            dora=dora,
        ),
    )
    return model


def fuse_model(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every ``LoRALinear`` by its fused layer (in place); returns ``model``."""
    swaps = [
        (path, m.fuse(dequantize=dequantize))
        for path, m in model.named_modules()
        if isinstance(m, (LoRALinear, LoRASwitchLinear))
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter parameters by full path (``model.layers.29.self_attn.q_proj.lora_a``)."""
    return dict(tree_flatten(model.trainable_parameters()))


def atomic_save_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file to a temp name in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}.safetensors"
    try:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as e:  # MLX reports a failed write without errno
            raise MlxllmError(
                f"could not write {path} ({str(e).strip()}); is the disk full? free some space or "
                "write to another folder"
            ) from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**getattr(model, "adapter_config", {}), **(extra or {})}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2))
    atomic_save_safetensors(folder / ADAPTER_FILE, adapter_weights(model))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict:
    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise MlxllmError(f"{path.parent} has no {CONFIG_FILE}; is it an adapter folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MlxllmError(f"{path} is not valid JSON ({e})") from None


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the adapter saved in ``folder`` to ``model`` (in place, unfused); returns it."""
    folder = Path(folder).expanduser()
    cfg = read_adapter_config(folder)
    apply_lora(
        model,
        rank=cfg["rank"],
        scale=cfg["scale"],
        dropout=cfg.get("dropout", 0.0),
        targets=tuple(cfg["targets"]),
        num_layers=cfg.get("num_layers"),
        dora=cfg.get("dora", False),
    )
    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise MlxllmError(f"{folder} has no {ADAPTER_FILE}")
    weights = mx.load(str(path))
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise MlxllmError(
            f"adapter {folder} does not fit this model (missing {missing}, unexpected {extra}); "
            "was it trained on another model?"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise MlxllmError(
                f"adapter tensor {k} has shape {v.shape}, the model needs "
                f"{expected[k].shape}; was it trained on another model?"
            )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())  # read the adapter now, not on the first token
    model.eval()
    return model
