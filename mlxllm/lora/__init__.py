"""LoRA / QLoRA / DoRA fine-tuning.

``mlxllm.lora.layers``: adapters as transforms (``apply_lora``, ``load_adapter``, ``fuse_model``);
``mlxllm.lora.data``: JSONL folders to masked token batches; ``mlxllm.lora.train``: the training
loop (``train``, ``finetune``); ``fuse`` here writes a model folder with the adapter merged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["fuse"]


def fuse(
    model_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    out: str | os.PathLike,
    bits: int | None = None,
    group_size: int | None = None,
    dequantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Merge an adapter into its base model and write a loadable model folder.

    Args:
        model_path: the base model (folder, alias or repo id) the adapter was trained on.
        adapter_path: folder with ``adapters.safetensors`` and ``adapter_config.json``.
        out: output folder (written to a temp sibling, then renamed; see ``mlxllm.output``).
        bits: quantize the fused model to this many bits (affine, ``group_size``).
        group_size: quantization group size with ``bits`` (default 64).
        dequantize: write float weights even when the base was quantized.
        dtype: dtype of float tensors (default: the base checkpoint's half type, else float32).
        force: replace an existing ``out``.

    Returns:
        The output folder.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxllm.convert import COPY_FILES, check_settings
    from mlxllm.convert.safetensors_io import StreamingWriter, write_index
    from mlxllm.loader import load_config, load_model, resolve
    from mlxllm.lora.layers import fuse_model, load_adapter
    from mlxllm.models.transforms import cast_weight
    from mlxllm.output import check_output, staged_output
    from mlxllm.quant import dequantize_model, make_predicate, quantize_model

    check_settings(bits, dtype, group_size)
    path = resolve(model_path)
    out = check_output(out, force, sources=[path, adapter_path])
    config = load_config(path)
    config.pop("_generation_config", None)
    src_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    out_dtype = getattr(
        mx, dtype or (src_dtype if src_dtype in ("float16", "bfloat16") else "float32")
    )

    model = load_model(path, dtype=mx.float32)
    load_adapter(model, adapter_path)
    if bits is not None or dequantize:
        # every layer in floating point, adapted or not: the output has no quantization block
        # (with --bits all layers are then quantized alike, not left at the base's settings)
        fuse_model(model, dequantize=True)
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    else:
        fuse_model(model)  # adapted layers keep the base's quantization
    if bits is not None:
        block = quantize_model(model, make_predicate("uniform", bits, group_size or 64))
        config["quantization"] = config["quantization_config"] = block
    config["torch_dtype"] = str(out_dtype).split(".")[-1]

    with staged_output(out, "fuse") as tmp:
        writer = StreamingWriter(tmp, int(2e9))
        tensors = dict(tree_flatten(model.parameters()))
        tensors.update(getattr(model, "aside_weights", {}) or {})
        for name, v in tensors.items():
            writer.add(name, cast_weight(name, v, out_dtype))  # routers stay float32
        write_index(tmp, writer.close(), writer.total_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in COPY_FILES:
            if (path / name).exists():
                shutil.copy(path / name, tmp / name)
    return out
