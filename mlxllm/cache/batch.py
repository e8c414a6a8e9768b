"""Batched caches: the rows of several sequences in one buffer, for one model call per step.

Rows have different lengths, so they are **left-padded** to a common length: row ``b`` holds its
positions at buffer indices ``[left[b], offset)``, and the padding is masked out of attention.
The RoPE position of row ``b``'s next token is ``offset - left[b]`` (``position``, ``[B]``), so
every row computes exactly what it would alone. Rows join (``extend``: the shorter side is padded
on the left) and leave (``filter``: padding that every remaining row shares is dropped) between
steps; both copy the buffers once, never per step.

``BatchKVCache`` batches ``KVCache`` (keys and values) and ``BatchLatentCache`` batches
``LatentCache`` (MLA's joint ``[c_kv, k_pe]`` rows, never expanded K/V); they share the
padding bookkeeping and differ only in what one write stores. ``batch_caches`` turns per-layer
caches of single sequences into batched ones.
"""

from __future__ import annotations

import mlx.core as mx

from mlxllm.cache import KVCache
from mlxllm.cache.latent import LatentCache


class _BatchCache:
    """Buffers ``[B, heads, capacity, width]`` with per-row left padding (see module doc)."""

    step = 256
    _last_position: tuple = (None, None)
    # a call of several queries sees the keys up to the end of the buffer (a multiple of
    # ``step``), the rest masked: on CUDA, MLX builds the attention of each new query/key shape
    # once (a cuDNN graph, ~70 ms for a 7B model), which at exact lengths a server pays on
    # nearly every request; the engine turns this on there (``BatchKVCache`` honours it)
    bucket_keys = False

    def __init__(self, buffers: list[mx.array], left: list[int], offset: int):
        self.buffers = buffers  # each [B, heads, capacity >= offset, width]
        self.left = list(left)  # per row: padding positions before its first one
        self.offset = offset

    @classmethod
    def from_rows(cls, states: list[list[mx.array]]) -> _BatchCache:
        """One row per single-sequence state (``cache.state``: arrays ``[1, h, n_b, w]``)."""
        lengths = [s[0].shape[2] if s else 0 for s in states]
        S = max(lengths)
        if S == 0:  # nothing stored yet: the first write makes the buffers
            return cls([], [0] * len(states), 0)
        like = next(s for s in states if s)
        rows = []
        for state, n in zip(states, lengths, strict=True):
            rows.append([_pad_left(a, S - n) for a in (state or _empty(like))])
        buffers = [mx.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]
        return cls(buffers, [S - n for n in lengths], S)

    # ---- the cache protocol ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.left)

    @property
    def position(self) -> mx.array:
        """RoPE position of each row's next token, ``[B]`` int32. Every layer of a step asks
        with the same layout, so the last one made is kept (for all batch caches: the key is
        the layout itself)."""
        key = (self.offset, tuple(self.left))
        if _BatchCache._last_position[0] != key:
            positions = mx.array([self.offset - p for p in self.left], mx.int32)
            _BatchCache._last_position = (key, positions)
        return _BatchCache._last_position[1]

    def make_mask(self, L: int) -> str | mx.array | None:
        """``L`` new queries after ``offset`` positions: ``[B, 1, L, offset + L]`` booleans (a
        key is visible if it is not padding and not in the future), or the plain forms when no
        row is padded."""
        S = self._key_span(L)
        if not any(self.left) and S == self.offset + L:
            return "causal" if L > 1 else None
        keys = mx.arange(S)
        queries = mx.arange(self.offset, self.offset + L)[:, None]  # [L, 1]
        visible = keys[None] >= mx.array(self.left)[:, None]  # [B, S]
        # a query in a row's padding (a batched prefill) sees itself: a row of nothing but
        # -inf turns to NaN, which reaches the real rows through the cache (0 * NaN)
        visible = visible[:, None, None, :] | (keys[None] == queries)[None, None]  # [B,1,L,S]
        if L > 1:
            visible = visible & (keys[None] <= queries)[None, None]
        return visible

    def _key_span(self, L: int) -> int:
        """Keys that a call of ``L`` new queries sees (the written ones, unless bucketed)."""
        return self.offset + L

    def _write(self, parts: list[mx.array]) -> int:
        """Append ``parts`` (each ``[B, heads, L, width_i]`` laid side by side along the width
        of ``buffers``: one part per buffer for K/V, two into the one latent buffer)."""
        raise NotImplementedError

    def _grow(self, L: int, dtype: mx.Dtype, widths: list[tuple[int, int]]) -> int:
        """Make room for ``L`` more positions (blocks of ``step``); return the new offset."""
        need = self.offset + L
        B = self.batch_size
        if not self.buffers or need > self.buffers[0].shape[2]:
            n_new = ((need + self.step - 1) // self.step) * self.step
            grow = n_new - self.offset
            fresh = []
            for i, (heads, width) in enumerate(widths):
                block = mx.zeros((B, heads, grow, width), dtype)
                if self.buffers:
                    # drop the unused tail before growing so the buffer stays [0, offset) + block
                    block = mx.concatenate([self.buffers[i][:, :, : self.offset], block], axis=2)
                fresh.append(block)
            self.buffers = fresh
        return need

    @property
    def state(self) -> list[mx.array]:
        return [b[:, :, : self.offset] for b in self.buffers]

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions of every row (never into a row's own start)."""
        n = min(n, self.offset - max(self.left, default=0))
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the ``B x offset`` positions held (padding included)."""
        return sum(b.nbytes // b.shape[2] * self.offset for b in self.buffers if b.shape[2])

    # ---- rows joining and leaving ------------------------------------------------------------

    def extend(self, other: _BatchCache) -> None:
        """Append ``other``'s rows after this cache's (the shorter side padded on the left)."""
        S = max(self.offset, other.offset)
        if S == 0:
            self.left += other.left
            return
        like = self.state if self.buffers else other.state
        mine = self.state or _empty(like, self.batch_size)
        theirs = other.state or _empty(like, other.batch_size)
        mine = [_pad_left(a, S - self.offset) for a in mine]
        theirs = [_pad_left(a, S - other.offset) for a in theirs]
        self.buffers = [mx.concatenate([a, b], axis=0) for a, b in zip(mine, theirs, strict=True)]
        self.left = [p + S - self.offset for p in self.left] + [
            p + S - other.offset for p in other.left
        ]
        self.offset = S

    def filter(self, rows: list[int]) -> None:
        """Keep ``rows`` (in that order); padding that every kept row has is dropped."""
        self.left = [self.left[r] for r in rows]
        cut = min(min(self.left, default=0), self.offset)
        idx = mx.array(rows, dtype=mx.int32)
        self.buffers = [b[idx, :, cut : self.offset] for b in self.buffers]
        self.left = [p - cut for p in self.left]
        self.offset -= cut

    def row_state(self, row: int, n: int | None = None) -> list[mx.array]:
        """Row ``row``'s first ``n`` positions (all by default), ``[1, heads, n, width]``
        (views of the batch buffers: copy what is kept, as the prefix store does)."""
        start = self.left[row]
        end = self.offset if n is None else start + n
        return [b[row : row + 1, :, start:end] for b in self.buffers]


def _empty(like: list[mx.array], B: int = 1) -> list[mx.array]:
    """Zero-length buffers shaped like ``like`` (a row that has stored nothing yet)."""
    return [mx.zeros((B, a.shape[1], 0, a.shape[3]), a.dtype) for a in like]


def _pad_left(a: mx.array, n: int) -> mx.array:
    if n == 0:
        return a
    B, h, _, w = a.shape
    return mx.concatenate([mx.zeros((B, h, n, w), a.dtype), a], axis=2)


class BatchKVCache(_BatchCache):
    """Batched ``KVCache``: ``buffers = [keys, values]``."""

    def _key_span(self, L: int) -> int:
        need = self.offset + L
        if not (self.bucket_keys and L > 1):
            return need
        # the buffer's capacity after the write (``_grow`` keeps it a multiple of ``step``)
        cap = self.buffers[0].shape[2] if self.buffers else 0
        return cap if need <= cap else -(-need // self.step) * self.step

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, n_kv, L, _ = keys.shape
        widths = [(n_kv, keys.shape[3]), (n_kv, values.shape[3])]
        span = self._key_span(L)
        need = self._grow(L, keys.dtype, widths)
        self.buffers[0][:, :, self.offset : need] = keys
        self.buffers[1][:, :, self.offset : need] = values
        self.offset = need
        return self.buffers[0][:, :, :span], self.buffers[1][:, :, :span]


class BatchLatentCache(_BatchCache):
    """Batched ``LatentCache``: ``buffers = [joint]`` with rows ``[c_kv, k_pe]``.

    Not a ``LatentCache``: MLA's single-sequence CUDA decode kernels take one position for the
    whole batch, so batched rows take the MLX path (masked absorbed attention)."""

    rank = 0

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        B, _, L, r = c_kv.shape
        need = self._grow(L, c_kv.dtype, [(1, r + k_pe.shape[-1])])
        self.rank = r
        self.buffers[0][:, :, self.offset : need, :r] = c_kv
        self.buffers[0][:, :, self.offset : need, r:] = k_pe
        self.offset = need
        return self.buffers[0][:, :, :need, :r], self.buffers[0][:, :, :need, r:]

    @property
    def joint(self) -> mx.array:
        """``[c_kv, k_pe]`` of all stored positions, ``[B, 1, offset, r + dr]``."""
        return self.buffers[0][:, :, : self.offset]


BATCHED = {KVCache: BatchKVCache, LatentCache: BatchLatentCache}


def batch_caches(rows: list[list]) -> list[_BatchCache]:
    """Per-layer batched caches from ``rows[b][layer]``, each a single-sequence cache."""
    out = []
    for layer in zip(*rows, strict=True):
        kind = BATCHED[type(layer[0])]
        out.append(kind.from_rows([c.state for c in layer]))
    return out
