"""Drafters for ``speculative_generate_step``: a smaller model with the same tokenizer, or an
MTP layer on the model's own hidden states.

A drafter keeps its own cache in step with the model's, across calls (a chat's turns): its
``offset`` is the positions it holds and ``trim_to(n)`` drops the rest, so a caller that reuses
the model's cache reuses at most as much of it as the drafter holds (``stream_generate`` does).

- ``begin(prompt_ids)``: the ids that follow what both caches hold;
  ``prefill(ids, start, end, hidden)``: the model's hidden states ``hidden`` of positions
  ``[start, end)`` of those ids;
- ``draft(k, probs, key) -> (ids[k], q[k, V] or None)``: propose ``k`` tokens after the last
  committed one (greedy when ``probs`` is None, else drawn from ``probs(logits)``, which is
  returned as ``q``);
- ``commit(k, a, hidden, tokens)``: of the ``k`` drafts, ``a`` were kept; ``tokens`` are the
  new committed ids (the kept drafts, then the model's own), ``hidden`` the model's hidden
  states at the positions before each of them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxllm.cache import KVCache
from mlxllm.speculative.mtp import MTPLayer, new_cache


def _pick(logits: mx.array, probs, key):
    """(token, its distribution or None): argmax, or a draw from ``probs(logits)``."""
    if probs is None:
        return mx.argmax(logits, axis=-1), None
    q = probs(logits[None])[0]
    return mx.random.categorical(mx.log(q), key=key), q


def _split(key, n: int):
    return [None] * n if key is None else list(mx.random.split(key, n))


class DraftModel:
    """A smaller model of the same vocabulary drafts token by token from its own cache."""

    def __init__(self, model):
        self.model = model
        self.cache, self.pending = model.make_cache(), []

    def state(self):
        return [c.state for c in self.cache]

    @property
    def offset(self) -> int:
        return min(c.offset for c in self.cache)

    def trim_to(self, n: int) -> None:
        for c in self.cache:
            c.trim(c.offset - min(n, c.offset))

    def begin(self, prompt_ids: list[int]) -> None:
        self.pending = [prompt_ids[-1]]

    def prefill(self, ids, start: int, end: int, hidden) -> None:
        self.model(mx.array(ids[start:end])[None], cache=self.cache)

    def draft(self, k: int, probs=None, key=None):
        x, self.pending = mx.array(self.pending, dtype=mx.int32)[None], []
        tokens, qs = [], []
        for i, sub in enumerate(_split(key, k)):
            t, q = _pick(self.model(x, cache=self.cache)[0, -1], probs, sub)
            tokens.append(t)
            if q is not None:
                qs.append(q)
            if i < k - 1:
                x = t.reshape(1, 1).astype(mx.int32)
        return mx.stack(tokens).astype(mx.int32), (mx.stack(qs) if qs else None)

    def commit(self, k: int, a: int, hidden, tokens: list[int]) -> None:
        if k:
            # the cache holds the inputs up to draft k - 1: keep those up to the last kept one
            for c in self.cache:
                c.trim(k - 1 - min(a, k - 1))
            self.pending = [tokens[k - 1]] if a == k else []
        self.pending.append(tokens[-1])


class MTPDrafter:
    """An MTP layer drafts from the model's hidden states (``mtp.py``); further drafts chain
    on its own output. Its cache gets the model's hidden state of every committed position."""

    def __init__(self, model, layer: MTPLayer):
        self.model, self.layer = model, layer
        self.cache, self.pending = new_cache(model), None

    def state(self):
        return self.cache.state

    @property
    def offset(self) -> int:
        return self.cache.offset

    def trim_to(self, n: int) -> None:
        self.cache.trim(self.cache.offset - min(n, self.cache.offset))

    def _embed(self, ids: mx.array) -> mx.array:
        return self.model.model.embed_tokens(ids)

    def begin(self, prompt_ids: list[int]) -> None:
        self.pending = None

    def prefill(self, ids, start: int, end: int, hidden) -> None:
        # position i pairs the hidden state of i with token i + 1
        nxt = mx.array(ids[start + 1 : end + 1], dtype=mx.int32)[None]
        self.layer(hidden, self._embed(nxt), cache=self.cache)

    def draft(self, k: int, probs=None, key=None):
        hidden, ids = self.pending
        out = self.layer(hidden, self._embed(mx.array(ids, dtype=mx.int32)[None]), self.cache)
        last = out[:, -1:]
        tokens, qs = [], []
        for i, sub in enumerate(_split(key, k)):
            t, q = _pick(self.layer.logits(self.model, last)[0, -1], probs, sub)
            tokens.append(t)
            if q is not None:
                qs.append(q)
            if i < k - 1:
                last = self.layer(last, self._embed(t.reshape(1, 1).astype(mx.int32)), self.cache)
        return mx.stack(tokens).astype(mx.int32), (mx.stack(qs) if qs else None)

    def commit(self, k: int, a: int, hidden, tokens: list[int]) -> None:
        if k > 1:
            self.cache.trim(k - 1)  # the chained drafts' positions
        self.pending = (hidden, tokens)


PROBE = "Speculative decoding needs one vocabulary: 0123 äöü 漢字 <|im_end|>\n\tdef f(x):"


def check_same_vocabulary(tokenizer, draft_tokenizer) -> None:
    """Refuse a draft model whose tokenizer differs (its tokens would mean other text)."""
    from mlxllm.errors import InvalidArgument

    same = (tokenizer.encode(PROBE) == draft_tokenizer.encode(PROBE)
            and set(tokenizer.eos_token_ids) == set(draft_tokenizer.eos_token_ids))  # fmt: skip
    if not same:
        raise InvalidArgument(
            "the draft model's tokenizer differs from the model's; pick a draft model of the "
            "same family (e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct)"
        )


def make_drafter(model, tokenizer, draft=None, mtp: bool | None = None, mtp_head=None):
    """The drafter a command asked for, or None: ``draft`` a loaded ``(model, tokenizer)``;
    ``mtp_head`` a head file; ``mtp`` the checkpoint's own MTP layer (None: when it has one)."""
    from mlxllm.errors import InvalidArgument
    from mlxllm.speculative.mtp import from_checkpoint, load_head

    if sum(x is not None for x in (draft, mtp_head)) > 1:
        raise InvalidArgument("pass one of --draft-model and --mtp-head, not both")
    if draft is not None:
        check_same_vocabulary(tokenizer, draft[1])
        return DraftModel(draft[0])
    if mtp_head is not None:
        return MTPDrafter(model, load_head(model, mtp_head))
    if mtp is False:
        return None
    layer = from_checkpoint(model)
    if layer is None:
        if mtp:
            raise InvalidArgument(
                "this checkpoint has no MTP layer; train one with `mlxllm finetune MODEL --mtp` "
                "and pass it with --mtp-head, or use --draft-model"
            )
        return None
    return MTPDrafter(model, layer)


class DraftPair(nn.Module):
    """A model and its draft model as one for the serving engine: ``make_cache`` gives the
    model's layer caches, then the draft's, and a call runs both on the same ids (the draft's
    logits are not computed: nothing reads them), so the engine's batch caches, prefill, prefix
    store and memory accounting carry the draft's cache along with the model's.

    A speculative step (``Engine._speculate``): ``propose(col, cache, i)`` for each column ``i``
    of the window (the draft caches), every column fed (``feeds_last``); then ``verify(window,
    cache)`` (all caches) runs the model. Afterwards every cache holds the window and the engine
    trims them alike."""

    feeds_last = True  # the window's last column goes into the draft's cache too

    def __init__(self, model, draft):
        super().__init__()
        self.target, self.draft = model, draft
        self.n_target = len(model.layers)

    @property
    def config(self):
        return self.target.config

    @property
    def layers(self):
        return self.target.layers

    def make_cache(self):
        return self.target.make_cache() + self.draft.make_cache()

    def split(self, cache) -> tuple[list, list]:
        return cache[: self.n_target], cache[self.n_target :]

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        mine, theirs = self.split(cache) if cache is not None else (None, None)
        self.draft.model(ids, cache=theirs)  # the draft's cache only
        return self.target(ids, cache=mine)

    def propose(self, col: mx.array, cache, i: int) -> mx.array:
        """Next-token logits ``[B, 1, V]`` after column ``col[B, 1]`` (``cache``: the draft's)."""
        return self.draft(col, cache=cache)

    def verify(self, window: mx.array, cache) -> mx.array:
        return self.target(window, cache=self.split(cache)[0])

    def max_queries(self, offset: int, batch: int = 1):
        limit = getattr(self.target, "max_queries", None)
        return limit(offset, batch) if limit is not None else None


def _previous(hidden: KVCache, B: int, D: int) -> mx.array:
    """``[B, 1, D]``: the hidden state at the position before the next one (zeros at none)."""
    n = hidden.offset
    if n == 0:
        return mx.zeros((B, 1, D))
    return hidden.state[0][:, 0, n - 1 : n]


class MTPPair(DraftPair):
    """A model and an MTP layer (``mtp.py``) as one for the serving engine, as ``DraftPair``.

    ``make_cache`` gives the model's layer caches, the MTP layer's, and one more ``KVCache``
    holding the model's final hidden state at every position (as keys, ``[B, 1, n, D]``, with
    no values), so the engine's batch rows, trims and prefix store carry them like any cache.
    The MTP entry at position ``j`` pairs token ``j`` with the hidden state at ``j - 1`` (a
    row's first position: zeros, or its left padding's), which keeps every cache in step: each
    call writes the same positions in all of them. Drafting chains on the layer's own output
    from the last hidden state; ``verify`` replaces the drafted entries by ones from the
    model's hidden states of the window, as ``MTPDrafter.commit`` does for one sequence."""

    feeds_last = False  # the last column's draft is never needed, nor its (replaced) entry

    def __init__(self, model, layer: MTPLayer):
        nn.Module.__init__(self)
        self.target, self.layer = model, layer
        self.n_target = len(model.layers)
        self._chain, self._drafted = None, 0

    def make_cache(self):
        return self.target.make_cache() + [new_cache(self.target), KVCache()]

    def _entries(self, ids: mx.array, h: mx.array, mtp, hidden: KVCache) -> None:
        prev = _previous(hidden, h.shape[0], h.shape[2]).astype(h.dtype)
        hidden.update_and_fetch(h[:, None], h[:, None, :, :0])
        pairs = mx.concatenate([prev, h[:, :-1]], axis=1).astype(self.layer.eh_proj.weight.dtype)
        self.layer(pairs, self.target.model.embed_tokens(ids), cache=mtp)

    def _run(self, ids: mx.array, cache) -> mx.array:
        main, (mtp, hidden) = self.split(cache)
        h = self.target.model(ids, cache=main)
        self._entries(ids, h, mtp, hidden)
        return self.target.head(h)

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        if cache is None:
            return self.target(ids)
        return self._run(ids, cache)

    def propose(self, col: mx.array, cache, i: int) -> mx.array:
        mtp, hidden = cache
        if i == 0:
            D = self.target.config.hidden_size
            self._chain, self._drafted = _previous(hidden, col.shape[0], D), 0
        e = self.target.model.embed_tokens(col)
        self._chain = self.layer(self._chain.astype(e.dtype), e, cache=mtp)
        self._drafted += 1
        return self.layer.logits(self.target, self._chain)

    def verify(self, window: mx.array, cache) -> mx.array:
        self.split(cache)[1][0].trim(self._drafted)  # the drafted entries
        self._drafted = 0
        return self._run(window, cache)
