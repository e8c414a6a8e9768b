"""Multi-token prediction (DeepSeek-V3 report, section 2.2): one more decoder block that reads
the model's hidden state at position ``i`` and the embedding of token ``i + 1`` and predicts
token ``i + 2``::

    x  = eh_proj([enorm(embed(t[i + 1])); hnorm(h[i])])      # 2 x dim -> dim
    h' = block(x)                                           # the family's decoder block
    logits = head(shared_head.norm(h'))                     # the model's own output head

``h`` is the model's final hidden state (after its last norm, what its head reads). Chained on
its own output ``h'`` and the token it drafted, the same module drafts further tokens.
Parameter names are DeepSeek-V3's (``model.layers.{N}.*`` with ``N = num_hidden_layers``);
the embedding and ``shared_head.head`` of the checkpoint are the model's own and not kept. A
head trained here (``mlxllm finetune --mtp``) has the same layout, saved as one safetensors file.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxllm.errors import MlxllmError
from mlxllm.models.base import DecoderBlock, attention_mask

FORMAT = "mlxllm-mtp-head"
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")  # config fields a head records


class SharedHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)


class MTPLayer(DecoderBlock):
    """``layer(hidden[B, L, D], embeds[B, L, D], cache) -> hidden'[B, L, D]`` (see module doc)."""

    def __init__(self, block: DecoderBlock, dim: int, eps: float):
        super().__init__(block.self_attn, block.mlp, dim, eps)
        self.enorm = nn.RMSNorm(dim, eps=eps)
        self.hnorm = nn.RMSNorm(dim, eps=eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.shared_head = SharedHead(dim, eps)

    def __call__(self, hidden: mx.array, embeds: mx.array, cache=None) -> mx.array:
        x = self.eh_proj(mx.concatenate([self.enorm(embeds), self.hnorm(hidden)], axis=-1))
        L = x.shape[1]
        mask = cache.make_mask(L) if cache is not None else attention_mask(L, 0)
        return super().__call__(x, mask, cache)

    def logits(self, model, h: mx.array) -> mx.array:
        """Next-token logits of ``h'`` through the model's head."""
        return model.head(self.shared_head.norm(h))


def mtp_layer(model) -> MTPLayer:
    """A fresh (randomly initialized) MTP layer for ``model``'s family and size."""
    c = model.config
    return MTPLayer(model.new_block(c.num_hidden_layers), c.hidden_size, c.rms_norm_eps)


def new_cache(model):
    """A cache for the MTP layer: the kind the model's layers use."""
    return model.make_cache()[-1]


def from_checkpoint(model) -> MTPLayer | None:
    """DeepSeek-V3/R1's own MTP layer from the weights the loader kept aside
    (``model.aside_weights``), or None when the checkpoint has none."""
    aside = getattr(model, "aside_weights", None) or {}
    n = getattr(model.config, "num_hidden_layers", None)
    prefix = f"model.layers.{n}."
    mine = {k[len(prefix) :]: v for k, v in aside.items() if k.startswith(prefix)}
    if not mine:
        return None
    if any(k.endswith(".scales") for k in mine):
        raise MlxllmError(
            "this checkpoint's MTP layer is quantized, which --mtp does not read yet; convert "
            "without quantizing it or pass --no-mtp"
        )
    for k in ("embed_tokens.weight", "shared_head.head.weight"):  # the model's own
        mine.pop(k, None)
    # the family's own renames (stacked experts, joined kv_b) on the names of a layer 0
    renamed = model.sanitize({f"model.layers.0.{k}": v for k, v in mine.items()})
    weights = {k[len("model.layers.0.") :]: v for k, v in renamed.items()}
    layer = mtp_layer(model)
    layer.load_weights(list(weights.items()), strict=True)
    layer.set_dtype(model.model.norm.weight.dtype)
    return layer


def save_head(layer: MTPLayer, path, metadata: dict | None = None) -> None:
    """One safetensors file: the layer's parameters under their checkpoint names, written to a
    temp file and renamed. ``metadata`` may name the base model (``model``) and its
    ``SHAPE_KEYS``, which ``load_head`` then checks."""
    from mlxllm.lora.layers import atomic_save_safetensors

    meta = {"format": FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    atomic_save_safetensors(path, dict(tree_flatten(layer.parameters())), meta)


def load_head(model, path) -> MTPLayer:
    """An MTP layer saved by ``save_head`` (``mlxllm finetune --mtp``) for ``model``; refused
    with one line when the file is not one or was trained for another model shape."""
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # noqa: BLE001 (any reason a file does not load is one message)
        raise MlxllmError(f"cannot read MTP head {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise MlxllmError(
            f"{path} is not an MTP head file (train one with `mlxllm finetune --mtp`)"
        )
    trained_for = meta.get("model", "another model")
    for key in SHAPE_KEYS:
        mine = getattr(model.config, key, None)
        if key in meta and mine is not None and meta[key] != str(mine):
            raise MlxllmError(
                f"MTP head {path} was trained for {trained_for} ({key} {meta[key]}), not for "
                f"this model ({key} {mine}); train one with `mlxllm finetune MODEL --mtp`"
            )
    layer = mtp_layer(model)
    want = dict(tree_flatten(layer.parameters()))
    wrong = sorted(k for k in want if k not in weights or weights[k].shape != want[k].shape)
    if wrong:
        raise MlxllmError(
            f"MTP head {path} does not fit this model ({wrong[0]} differs); it was trained for "
            f"{trained_for}"
        )
    layer.load_weights(list(weights.items()), strict=True)
    layer.set_dtype(model.model.norm.weight.dtype)
    return layer
