"""Config base and attention masks shared by every family."""

from __future__ import annotations

import dataclasses
import logging

import mlx.core as mx
import mlx.nn as nn

from mlxllm.kernels.decode import add_rms_norm

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


def context_length(config) -> int | None:
    """The longest sequence a model is made for: ``max_position_embeddings``, or RoPE scaling's
    ``factor x original_max_position_embeddings`` when that is longer (Qwen2.5's YaRN keeps
    ``max_position_embeddings`` at 32K while extending to 128K). None when the config says
    nothing."""
    limit = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_scaling", None) or {}
    orig, factor = scaling.get("original_max_position_embeddings"), scaling.get("factor")
    if orig and factor and scaling.get("rope_type") in ("yarn", "dynamic", "linear", "llama3"):
        limit = max(limit or 0, int(orig * factor))
    return int(limit) if limit else None


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


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``.

    Families differ only in which attention (GQA, MLA) and which MLP (SwiGLU, MoE) they pass.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dim: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x, mask=None, cache=None):
        a = self.self_attn(self.input_layernorm(x), mask, cache)
        # h = x + a and its norm: one kernel at CUDA decode (kernels/decode.py)
        h, n = add_rms_norm(x, a, self.post_attention_layernorm)
        if getattr(type(self.mlp), "adds_residual", False):
            return self.mlp(n, residual=h)  # MoE blocks fold the add into their last kernel
        return h + self.mlp(n)


class Backbone(nn.Module):
    """Embedding, the blocks and the final norm (HF's ``model.*`` prefix)."""

    def __init__(self, vocab_size: int, dim: int, eps: float, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = layers
        self.norm = nn.RMSNorm(dim, eps=eps)

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(ids)
        cache = cache or [None] * len(self.layers)
        L = ids.shape[1]
        # the cache knows its layout (a batch cache masks its rows' padding)
        mask = cache[0].make_mask(L) if cache[0] is not None else attention_mask(L, 0)
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


class CausalLM(nn.Module):
    """``model(ids[B, L], cache=None) -> logits[B, L, vocab]`` over a family's blocks."""

    def __init__(self, config, layers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.model = Backbone(config.vocab_size, config.hidden_size, config.rms_norm_eps, layers)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        return self.head(self.model(ids, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states ``[..., dim]`` -> logits ``[..., vocab]`` (tied or ``lm_head``)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def max_queries(self, offset: int, batch: int = 1) -> int | None:
        """Most new positions one call should take after ``offset`` cached ones so that every
        attention layer with a score budget (MLA) computes its scores in one chunk; None when
        no layer has one.

        Layers never evaluate (they run under ``mx.compile`` and autodiff), so their query
        chunks bound each score tensor but not the peak of one lazy call; callers that bound
        memory (generation's prefill) feed at most this many positions per evaluated call.
        """
        limits = [
            layer.self_attn.max_queries(offset, batch)
            for layer in self.layers
            if hasattr(layer.self_attn, "max_queries")
        ]
        return min(limits) if limits else None

    def make_cache(self):
        from mlxllm.cache import make_kv_caches

        return make_kv_caches(len(self.model.layers))

    def sanitize(self, weights: dict) -> dict:
        # inv_freq is recomputed from the config; a tied lm_head would be an unexpected key
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
