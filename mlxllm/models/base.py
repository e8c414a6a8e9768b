"""Config base and attention masks shared by every family."""

from __future__ import annotations

import dataclasses
import logging

import mlx.core as mx

log = logging.getLogger("mlxllm")


def normalize_rope(config: dict) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling) from either config.json layout found in the wild.

    transformers 4 writes ``rope_theta`` at the top level and ``rope_scaling`` with ``type`` or
    ``rope_type``; transformers 5 writes ``rope_parameters`` holding ``rope_theta`` and the
    scaling keys. Reading only one layout silently runs the other with the wrong RoPE.
    The returned scaling dict always has ``rope_type`` and, for scalings that need it,
    ``original_max_position_embeddings`` (HF defaults it to ``max_position_embeddings``).
    """
    params = config.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type rope parameters (sliding vs full): the families here use one
        params = params.get("full_attention") or next(iter(params.values()))
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    if not scaling and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return float(theta), None
    scaling["rope_type"] = scaling.get("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    if scaling["rope_type"] == "default":
        return float(theta), None
    if scaling["rope_type"] in ("llama3", "yarn", "longrope"):
        orig = config.get("original_max_position_embeddings")
        if orig is not None and scaling["rope_type"] == "longrope":
            scaling["original_max_position_embeddings"] = orig
        scaling.setdefault(
            "original_max_position_embeddings",
            orig or config.get("max_position_embeddings", 4096),
        )
    return float(theta), scaling


@dataclasses.dataclass
class BaseConfig:
    """A family config: HF field names, defaults for what older checkpoints omit."""

    model_type: str

    @classmethod
    def from_hf(cls, config: dict):
        """Keep the keys this family knows; log the ones it drops (not an error)."""
        theta, scaling = normalize_rope(config)
        cfg = dict(config, rope_theta=theta, rope_scaling=scaling)
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in cfg.items() if k in names}
        dropped = sorted(set(cfg) - names - {"rope_parameters"})
        if dropped:
            log.debug("%s config: ignoring keys %s", cls.__name__, ", ".join(dropped))
        return cls(**kept)


def attention_mask(L: int, offset: int) -> str | None:
    """Mask for ``L`` new queries after ``offset`` cached positions.

    One query needs no mask; several use the fused causal mask, which MLX aligns to the end of
    the key sequence (query i sees keys ``[0, offset + i]``).
    """
    return "causal" if L > 1 else None


def causal_mask_array(L: int, offset: int, dtype=mx.float32) -> mx.array:
    """Explicit additive causal mask ``[L, offset + L]`` for code paths that need an array."""
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None]
    return mx.where(k <= q, 0.0, -mx.inf).astype(dtype)
