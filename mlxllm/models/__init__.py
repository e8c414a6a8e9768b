"""Family registry: Hugging Face ``model_type`` -> family module (imported on demand)."""

from __future__ import annotations

import importlib

from mlxllm.errors import MlxllmError

# model_type -> module under mlxllm.models
FAMILIES = {
    "llama": "dense",
    "mistral": "dense",
    "qwen2": "dense",
    "qwen3": "dense",
    "deepseek": "deepseek",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_type: str | None):
    """Return the family module for ``model_type`` or raise a clear error."""
    if not model_type:
        raise MlxllmError(
            "config.json has no 'model_type'; add it (supported: "
            f"{', '.join(supported_model_types())})"
        )
    if model_type not in FAMILIES:
        raise MlxllmError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return importlib.import_module(f"mlxllm.models.{FAMILIES[model_type]}")


def build_model(config: dict):
    """Build an uninitialized model (random weights) from a config.json dict."""
    family = get_family(config.get("model_type"))
    cfg = family.Model.config_class.from_hf(config)
    return family.Model(cfg)
