"""Find a model (local folder, alias or Hub repo), build its family and load its weights.

Both folder layouts load the same way: Hugging Face (config.json + one or many safetensors with
an index) and MLX (as mlx-community publishes: the same, plus a ``quantization`` key in
config.json and packed ``weight``/``scales``/``biases``).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxllm.errors import MlxllmError, read_json_object
from mlxllm.models import build_model
from mlxllm.models.transforms import cast_weight, dequant_fp8_weights
from mlxllm.registry import resolve_alias

# What a snapshot download fetches: weights, config and tokenizer files, never code or pickles.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.tiktoken",
]


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on MLX's CPU backend.

    On the CPU backend half-precision matmuls are 9x (GEMV) to 30x (GEMM) slower than float32
    (measured with mlx 0.32.4 + OpenBLAS) and quantized matmul with bf16 scales is slower and
    less exact, so there float32 is both faster and closer to the reference.
    """
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def download(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot a Hub repo (only weights/config/tokenizer files) into the HF cache.

    Honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN through huggingface_hub itself. Progress bars
    come from huggingface_hub.
    """
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except hf_errors.GatedRepoError:
        raise MlxllmError(
            f"{repo_id} is gated: accept its license on huggingface.co, then set HF_TOKEN"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise MlxllmError(
            f"Hub repo {repo_id!r} not found (or private: set HF_TOKEN); check the name"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise MlxllmError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE to download it, or pass a local folder"
            ) from None
        raise MlxllmError(
            f"cannot reach the Hugging Face Hub to download {repo_id} and it is not cached; "
            "check your connection, or pass a local folder"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise MlxllmError(f"download of {repo_id} failed: {e}; check the connection") from None
    return Path(path)


def _local_hint(p: Path) -> str | None:
    """Why ``p`` looks like a local path that is not a model folder (None: it does not)."""
    if p.is_file():
        return f"{p} is a file; pass the model folder that holds config.json"
    parent = p.parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return None
    import difflib

    names = [c.name for c in parent.iterdir() if c.is_dir()]
    close = difflib.get_close_matches(p.name, names, n=1)
    hint = f" (did you mean {parent / close[0]}?)" if close else ""
    return f"no model folder {p}{hint}"


def resolve(name: str | os.PathLike, revision: str | None = None) -> Path:
    """Local folder, alias or Hub repo id -> local folder holding config.json."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise MlxllmError(
                f"{p} has no config.json; point to a Hugging Face or MLX model folder"
            )
        return p
    name = str(name)
    # a path whose folder exists here (./out/model-4bitt, out/model) or a file is a typo'd
    # local path, not a Hub repo id
    hint = _local_hint(p)
    if hint is not None:
        raise MlxllmError(hint)
    repo = resolve_alias(name)
    if repo is None and _is_repo_id(name):
        repo = name
    if repo is None:
        raise MlxllmError(
            f"unknown model {name!r}: not a folder, an alias (see `mlxllm models`) or a Hub "
            "repo id such as Qwen/Qwen2.5-7B-Instruct"
        )
    path = download(repo, revision)
    if not (path / "config.json").exists():
        raise MlxllmError(f"{repo} has no config.json; is it a transformers model repo?")
    return path


def load_config(path: Path) -> dict:
    config = read_json_object(path / "config.json", "model config")
    gen = path / "generation_config.json"
    if gen.exists():
        config["_generation_config"] = read_json_object(gen, "generation config")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards, checked against the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise MlxllmError(
                f"{index} has no weight_map of tensor names to files; fix or re-download it"
            )
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise MlxllmError(
                f"{path} is missing weight shard(s) {', '.join(missing[:3])} listed in "
                "model.safetensors.index.json; re-download the model"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise MlxllmError(
                f"{path} has only pickled PyTorch weights (*.bin), which can run code when "
                "loaded; convert them to safetensors first"
            )
        raise MlxllmError(f"{path} has no *.safetensors weight files")
    return files


def load_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a folder, lazily (nothing is read until evaluated)."""
    weights = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX raises a bare RuntimeError/ValueError on corrupt files
            raise MlxllmError(f"cannot read {f}: {e}; the file may be truncated") from None
    return weights


def cast_weights(weights: dict, dtype: mx.Dtype) -> dict:
    """Floating tensors to ``dtype``, routers to float32 (``transforms.cast_weight``, the rule
    the converter writes by); packed integers stay as they are."""
    return {k: cast_weight(k, v, dtype) for k, v in weights.items()}


def load_model(path: Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> nn.Module:
    """Build the family for ``path``'s config and load its weights.

    Args:
        path: local model folder.
        dtype: compute dtype for floating weights (default: ``default_dtype()``).
        lazy: leave weights unevaluated (read on first use).
    """
    config, weights = load_config(path), load_weights(path)
    return model_from_weights(config, weights, dtype, lazy, str(path))


def check_dtypes(model: nn.Module, weights: dict, source: str) -> None:
    """A tensor stored as integers where the model computes with floats (or the reverse) is a
    corrupt or foreign checkpoint: refuse it rather than cast garbage into the model."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(model.parameters()))  # shapes and dtypes only: nothing runs
    for k, v in weights.items():
        want = expected.get(k)
        if want is None:
            continue  # load_weights names what does not belong
        if mx.issubdtype(want.dtype, mx.floating) != mx.issubdtype(v.dtype, mx.floating):
            raise MlxllmError(
                f"tensor {k} in {source} is stored as {str(v.dtype).split('.')[-1]}, but the "
                "model needs "
                f"{'floating point' if mx.issubdtype(want.dtype, mx.floating) else want.dtype}; "
                "the checkpoint is corrupt or not for this architecture"
            )


def model_from_weights(
    config: dict,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    source: str = "memory",
) -> nn.Module:
    """``load_model`` on a config dict and checkpoint tensors already in memory (named as
    stored: Hugging Face or MLX layout).

    Args:
        config: the ``config.json`` dict.
        weights: tensor name -> array, as a checkpoint stores them.
        dtype, lazy: as for ``load_model``.
        source: where the weights came from (a folder), for error messages.
    """
    model = build_model(config)
    weights = model.sanitize(dequant_fp8_weights(weights))
    # weights a family keeps aside (DeepSeek-V3's MTP layers): held lazily, never evaluated here
    aside = model.set_aside(weights) if hasattr(model, "set_aside") else {}
    if "quantization" in config:
        from mlxllm.quant import quantize_from_config

        quantize_from_config(model, config["quantization"], weights)
    check_dtypes(model, weights, source)
    weights = cast_weights(weights, dtype or default_dtype())
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MlxllmError(
            f"weights in {source} do not match the {config['model_type']} architecture: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    model.eval()
    if not lazy:
        mx.eval(model.parameters())  # read the weights now so the first token is not slow
    model.config.generation_config = config.get("_generation_config", {})
    # a plain attribute, not a child: nn.Module would count a dict as part of its parameters
    object.__setattr__(model, "aside_weights", aside)
    return model


def load(
    path_or_repo: str | os.PathLike,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    revision: str | None = None,
):
    """Load a model and its tokenizer.

    Args:
        path_or_repo: a local folder (HF or MLX layout), an alias such as ``qwen2.5-7b`` or a Hub
            repo id such as ``Qwen/Qwen2.5-7B-Instruct``.
        dtype: compute dtype (default bfloat16 on a GPU, float32 on the CPU backend).
        lazy: do not read the weights until first use.
        revision: Hub revision (branch, tag or commit).

    Returns:
        ``(model, tokenizer)``.
    """
    from mlxllm.tokenizer import load_tokenizer

    path = resolve(path_or_repo, revision)
    model = load_model(path, dtype, lazy)
    tokenizer = load_tokenizer(path)
    gen = getattr(model.config, "generation_config", {}) or {}
    eos = gen.get("eos_token_id")
    if eos is not None:
        tokenizer.eos_token_ids |= set(eos if isinstance(eos, list) else [eos])
    return model, tokenizer
