"""KV caches behind one small protocol.

A cache is an object per layer, made by ``model.make_cache()`` and passed into the model. The
protocol (what the generation engine relies on):

- ``offset``: number of positions already stored;
- ``position``: the RoPE position of the next token (``offset`` here; a batch cache gives one
  per row, ``[B]``, since its rows are left-padded to a common length);
- ``make_mask(L)``: the attention mask for ``L`` new queries (``None``, ``"causal"`` or an
  array; called before the layers store them);
- ``update_and_fetch(keys, values)``: append ``[B, n_kv_heads, L, head_dim]`` and return all
  stored keys/values ``[B, n_kv_heads, offset + L, head_dim]``;
- ``state``: the arrays to evaluate (``mx.eval(c.state)`` after a prefill chunk);
- ``trim(n)``: drop the last ``n`` positions (stop-string rollback, speculative decoding),
  returning how many were dropped.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx


class Cache(Protocol):
    offset: int

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...

    @property
    def state(self) -> list[mx.array]: ...

    def trim(self, n: int) -> int: ...

    @property
    def position(self) -> int | mx.array: ...

    def make_mask(self, L: int) -> str | mx.array | None: ...


class _Single:
    """What the one-sequence caches share: position, mask."""

    offset: int

    @property
    def position(self) -> int:
        return self.offset

    def make_mask(self, L: int) -> str | None:
        # one query needs no mask; several use the fused causal mask, which MLX aligns to the
        # end of the keys (query i sees keys [0, offset + i])
        return "causal" if L > 1 else None


class KVCache(_Single):
    """Plain per-layer K/V cache that grows in blocks of ``step`` positions.

    Growing in blocks keeps decode allocation-free for ``step - 1`` of every ``step`` tokens:
    new K/V are written into the preallocated buffer by slice assignment.
    """

    step = 256
    # a call of a few queries (a speculative verify, a short chunk) sees the keys up to the
    # next multiple of ``step``, the rest masked: on CUDA, MLX compiles the attention of several
    # queries for each key length (~70 ms for a 7B model), which at an exact length it would
    # do on every verify call
    window_queries = 16

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _bucket(self, L: int) -> int | None:
        """Keys a call of ``L`` queries sees (None: exactly the written ones)."""
        if not 1 < L <= self.window_queries:
            return None
        need = self.offset + L
        n = -(-need // self.step) * self.step
        if self.keys is not None and need <= self.keys.shape[2]:
            n = min(n, self.keys.shape[2])  # a buffer loaded at its exact length
        return n

    def make_mask(self, L: int) -> str | mx.array | None:
        n = self._bucket(L)
        if n is None:
            return super().make_mask(L)
        q = mx.arange(self.offset, self.offset + L)[:, None]
        return mx.arange(n)[None] <= q  # [L, n]: causal, and nothing past the written keys

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, n_kv, L, _ = keys.shape
        need = self.offset + L
        if self.keys is None or need > self.keys.shape[2]:
            n_new = ((need + self.step - 1) // self.step) * self.step
            grow = n_new - (0 if self.keys is None else self.offset)  # after dropping the tail
            k_blk = mx.zeros((B, n_kv, grow, keys.shape[3]), keys.dtype)
            v_blk = mx.zeros((B, n_kv, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k_blk, v_blk
            else:
                # drop the unused tail before growing so the buffer stays [0, offset) + block
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], k_blk], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], v_blk], axis=2)
        n = self._bucket(L) or need
        self.keys[..., self.offset : need, :] = keys
        self.values[..., self.offset : need, :] = values
        self.offset = need
        return self.keys[..., :n, :], self.values[..., :n, :]

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def load(self, state: list[mx.array]) -> None:
        """Hold ``state`` (``[keys, values]`` of ``[1, n_kv_heads, n, head_dim]``, e.g. from a
        prefix store) as the first ``n`` positions."""
        self.keys, self.values = state
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of K/V actually held for ``offset`` positions."""
        if self.keys is None:
            return 0
        per_pos = (self.keys.nbytes + self.values.nbytes) // self.keys.shape[2]
        return per_pos * self.offset


def make_kv_caches(n_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(n_layers)]


class PromptCache:
    """Layer caches plus the token ids they hold, so a conversation is never re-prefilled.

    ``prepare(ids)`` keeps the longest common prefix of what is cached and ``ids``, trims the
    rest, and returns the ids still to run. Chat templates that rewrite earlier turns (Qwen3
    drops past ``<think>`` blocks) then cost only a re-prefill from the first changed token.
    """

    def __init__(self, model):
        self.layers = model.make_cache()
        self.ids: list[int] = []

    @property
    def offset(self) -> int:
        return min(c.offset for c in self.layers)

    def sync(self, ids: list[int] | None = None) -> None:
        """Make all layers agree (after an interrupt) and record which ids they hold."""
        n = self.offset
        for c in self.layers:
            c.trim(c.offset - n)
        if ids is not None:
            self.ids = list(ids[:n])
        else:
            self.ids = self.ids[:n]

    def prepare(self, ids: list[int], keep: int | None = None) -> list[int]:
        """Trim to the common prefix with ``ids`` (at most ``keep`` positions); returns the ids
        still to run."""
        self.sync()
        common = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always run at least one token to get logits
        if keep is not None:
            common = min(common, keep)
        for c in self.layers:
            c.trim(c.offset - common)
        self.ids = self.ids[:common]
        return ids[common:]

    def reset(self) -> None:
        for c in self.layers:
            c.trim(c.offset)
        self.ids = []
