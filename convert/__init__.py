"""Hugging Face -> MLX conversion, streaming one source shard and one tensor at a time.

``convert(src, out, ...)``: validates everything first (config, family, shards, headers), then
for each source shard loads tensors lazily, applies the family's ``sanitize`` and FP8
dequantization, quantizes what the recipe says, and streams the result into bounded output
shards. Everything is written into a temporary sibling folder that is renamed at the end, so a
failure or Ctrl-C leaves no OUT behind and an existing OUT is only replaced with ``force``.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from pathlib import Path

from mlxllm.errors import MlxllmError

COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = ("bfloat16", "float16", "float32")
_LAYER_PREFIX = re.compile(r"(.*?\.layers\.\d+)\.")


BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
GROUP_SIZES = (32, 64, 128)


def check_settings(bits: int | None, dtype: str | None, group_size: int | None = None) -> None:
    """Validate the settings shared by ``convert`` and ``fuse`` before any work starts."""
    if bits is not None and bits not in BITS:
        raise MlxllmError(f"--bits {bits} is not supported; use {', '.join(map(str, BITS))}")
    if group_size is not None and group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise MlxllmError(f"--group-size {group_size} is not supported; use {sizes}")
    if dtype is not None and dtype not in DTYPES:
        raise MlxllmError(f"--dtype {dtype} is not supported; use {', '.join(DTYPES)}")


def check_quantization(bits: int | None, group_size: int | None, mode: str, recipe: str | None):
    """``--mode``/``--recipe`` and the bits and group size they allow (MX formats fix both)."""
    from mlxllm.quant import MODE_DEFAULTS, RECIPES, supported_modes

    if mode != "affine":
        if mode not in supported_modes():
            modes = ", ".join(supported_modes())
            raise MlxllmError(f"--mode {mode!r} is not supported by this MLX; use one of {modes}")
        fixed = MODE_DEFAULTS[mode]
        asked = {"bits": bits, "group_size": group_size}
        clash = [k for k, v in asked.items() if v is not None and v != fixed[k]]
        if clash:
            raise MlxllmError(
                f"--mode {mode} fixes {fixed['bits']} bits and group size {fixed['group_size']}; "
                f"drop --{clash[0].replace('_', '-')}"
            )
    if recipe is not None and recipe not in RECIPES:
        raise MlxllmError(f"--recipe {recipe!r} is unknown; use {' or '.join(RECIPES)}")
    if recipe == "mixed_4_6" and (mode != "affine" or bits not in (None, 4)):
        raise MlxllmError(
            "--recipe mixed_4_6 is 4-bit affine (6 bits where it matters); drop --bits/--mode"
        )


def check_not_quantized(config: dict, path: Path) -> None:
    """Refuse a source that is already quantized (an MLX layout, GPTQ/AWQ/bitsandbytes...):
    its packed weights cannot be quantized again. FP8 checkpoints are dequantized instead."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if "quantization" in config or (method is not None and method != "fp8"):
        what = f"{method}-" if method and "quantization" not in config else ""
        raise MlxllmError(
            f"{path} is already {what}quantized; convert from the original float checkpoint "
            "(or use it as it is: mlxllm loads MLX-quantized folders directly)"
        )


def _source_files(src: Path, allow_pickle: bool) -> list[Path]:
    """The weight files in ``src``: safetensors (checked against the index), or pickles."""
    from mlxllm.loader import weight_files

    if not list(src.glob("*.safetensors")) and not (src / "model.safetensors.index.json").exists():
        pickles = sorted(src.glob("*.bin")) + sorted(src.glob("*.pt"))
        if pickles and allow_pickle:
            return pickles
        if pickles:
            raise MlxllmError(
                f"{src} has only pickled PyTorch weights (*.bin); unpickling can run arbitrary "
                "code, so pass --allow-pickle only if you trust the source"
            )
    return weight_files(src)


def _load_pickle(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise MlxllmError("reading *.bin weights needs PyTorch: pip install torch") from None
    import mlx.core as mx

    # weights_only=True refuses arbitrary objects, but the format remains a pickle
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: mx.array(v.float().numpy()) for k, v in state.items()}


def _model_card(src_name: str, settings: dict) -> str:
    date = datetime.date.today().isoformat()
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    return (
        f"# {Path(src_name).name} (MLX)\n\n"
        f"Converted from `{src_name}` with mlxllm on {date}.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n"
        f"Run it with `mlxllm chat PATH` or `mlxllm.load(PATH)`; it also loads in mlx-lm.\n"
    )


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    bits: int | None = None,
    group_size: int | None = None,
    dtype: str | None = None,
    recipe: str | None = None,
    mode: str = "affine",
    force: bool = False,
    allow_pickle: bool = False,
    shard_size_gb: float = 2.0,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face checkpoint into an MLX folder, optionally quantized.

    Args:
        src: local HF folder, Hub repo id or alias.
        out: output folder: new, or with ``force`` empty or an earlier output of mlxllm's; never
            the source, the current folder or a folder holding other files (``mlxllm.output``).
        bits: quantize to this many bits (2, 3, 4, 5, 6 or 8); None keeps float weights
            (unless ``recipe`` or an MX ``mode``).
        group_size: elements per quantization group (32, 64 or 128; default 64).
        dtype: dtype of float tensors and scales (default: the source's half type, else bf16).
        recipe: ``uniform`` or ``mixed_4_6`` (implies 4-bit).
        mode: ``affine`` or an MX format (``mxfp4``, ``mxfp8``, ``nvfp4``).
        force: replace an existing ``out``.
        allow_pickle: accept pickled ``*.bin`` weights.
        shard_size_gb: maximum output shard size.

    Returns:
        The output folder.
    """
    import mlx.core as mx

    from mlxllm.convert.safetensors_io import StreamingWriter, read_header, write_index
    from mlxllm.loader import load_config, resolve
    from mlxllm.models import build_model
    from mlxllm.models.base import normalize_rope
    from mlxllm.models.transforms import cast_weight, dequant_fp8_weights
    from mlxllm.output import check_output, staged_output
    from mlxllm.quant import make_predicate, quantization_config

    check_quantization(bits, group_size, mode, recipe)
    check_settings(bits, dtype, group_size if mode == "affine" else None)
    group_size = group_size or 64

    # 1. validate everything before writing anything
    path = resolve(src)
    out = check_output(out, force, sources=[path])
    config = load_config(path)
    config.pop("_generation_config", None)
    check_not_quantized(config, path)
    model = build_model(config)  # lazy parameters: nothing is allocated
    files = _source_files(path, allow_pickle)
    headers = {f: read_header(f) for f in files if f.suffix == ".safetensors"}
    where = {k: f for f, h in headers.items() for k in h if k != "__metadata__"}
    src_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    dtype = dtype or ("float16" if src_dtype == "float16" else "bfloat16")
    out_dtype = getattr(mx, dtype)
    quantize = bits is not None or recipe is not None or mode != "affine"
    predicate = (
        make_predicate(recipe or "uniform", bits or 4, group_size, mode, model=model)
        if quantize
        else None
    )
    modules = dict(model.named_modules())

    # 2. stream shards into a temporary sibling folder that replaces OUT only when complete
    with staged_output(out, "convert") as tmp:
        chosen: dict[str, dict] = {}
        progress_bar = _progress(progress)
        task = None
        writer = StreamingWriter(
            tmp, int(shard_size_gb * 1e9), on_write=lambda _: progress_bar.advance(task)
        )
        # A layer is converted once its last tensor has been read: experts of one layer (or an
        # FP8 weight and its scales) may be split over two shards. Carried tensors stay lazy.
        last = {}
        for k, f in where.items():
            last[_group(k)] = max(last.get(_group(k), -1), files.index(f))
        carried: dict = {}
        with progress_bar:
            for i, f in enumerate(files):
                shard = mx.load(str(f)) if f.suffix == ".safetensors" else _load_pickle(f)
                weights = {**carried, **shard}
                carried = {k: v for k, v in weights.items() if last.get(_group(k), i) > i}
                weights = {k: v for k, v in weights.items() if k not in carried}
                del shard
                weights = model.sanitize(dequant_fp8_weights(weights))
                # kept-aside weights (DeepSeek-V3 MTP layers) pass through under their own names
                aside = model.set_aside(weights) if hasattr(model, "set_aside") else {}
                outputs = _plan(weights, modules, predicate, out_dtype, chosen)
                outputs += [(k, cast_weight(k, v, out_dtype)) for k, v in sorted(aside.items())]
                del aside
                # Only the writer may hold these arrays: anything else that references one keeps
                # its evaluated buffer (and the source tensor) alive for the whole shard.
                del weights
                task = progress_bar.add_task(f.name, total=len(outputs))
                outputs.reverse()
                while outputs:
                    writer.add(*outputs.pop())
                writer.flush_shard()  # output shards follow source shards
        write_index(tmp, writer.close(), writer.total_bytes)

        config.pop("quantization", None)
        config.pop("quantization_config", None)
        if chosen:
            block = quantization_config(chosen)
            config["quantization"] = block
            config["quantization_config"] = block  # mlx-lm writes both keys
        config["torch_dtype"] = dtype
        # also write the transformers-4 RoPE keys: readers that know only those (mlx-lm 0.32
        # ignores rope_parameters) would otherwise run the model with the wrong RoPE
        theta, scaling = normalize_rope(config)
        config["rope_theta"] = theta
        if scaling:
            config["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in COPY_FILES:
            if (path / name).exists():
                shutil.copy(path / name, tmp / name)
        settings = {"source": str(src), "dtype": dtype, "quantization": _describe(chosen)}
        (tmp / "README.md").write_text(_model_card(str(src), settings))
    return out


def _plan(weights: dict, modules: dict, predicate, out_dtype, chosen: dict) -> list:
    """The output tensors for one source shard, as lazy arrays (nothing is computed yet).

    Weights of layers the predicate selects become packed codes + scales (+ biases); the rest
    are cast to the output dtype, routers to float32 (``transforms.cast_weight``: the rule the
    loader applies; the predicates never select a router). ``chosen`` collects each quantized
    layer's settings.
    """
    import mlx.core as mx

    from mlxllm.models.transforms import cast_weight

    outputs = []
    for name in sorted(weights):
        w = weights[name]
        mpath, _, leaf = name.rpartition(".")
        q = None
        if predicate is not None and leaf == "weight" and mpath in modules:
            q = predicate(mpath, modules[mpath])
        if not q:
            outputs.append((name, cast_weight(name, w, out_dtype)))
            continue
        chosen[mpath] = q
        # quantize in the storage dtype: the codes are then fit to the rounded scales
        packed, scales, *biases = mx.quantize(
            _cast(w, out_dtype), q["group_size"], q["bits"], mode=q["mode"]
        )
        outputs += [(name, packed), (f"{mpath}.scales", _cast(scales, out_dtype))]
        outputs += [(f"{mpath}.biases", b.astype(out_dtype)) for b in biases[:1]]
    return outputs


def _describe(chosen: dict[str, dict]) -> str:
    """What the quantized layers actually got: ``"4-bit group 64 affine"`` (the most common
    setting), plus how many layers differ."""
    if not chosen:
        return "none"
    settings = [(q["bits"], q["group_size"], q["mode"]) for q in chosen.values()]
    common = max(set(settings), key=settings.count)
    text = f"{common[0]}-bit, group {common[1]}, {common[2]}"
    others = len(settings) - settings.count(common)
    return text + (f" ({others} layers at other settings)" if others else "")


def _group(key: str) -> str:
    """The unit converted together: a decoder layer, or a single tensor with its FP8 scales."""
    m = _LAYER_PREFIX.match(key)
    if m:
        return m.group(1)
    return key.removesuffix("_scale_inv")


def _cast(w, dtype):
    """Float tensors to the output dtype; integer and MX scale bytes stay as they are."""
    import mlx.core as mx

    return w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )
