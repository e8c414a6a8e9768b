"""Latent cache for multi-head latent attention (DeepSeek-V2/V3 MLA).

Per position it stores only the normalized latent ``c_kv[kv_lora_rank]`` and the roped shared
key ``k_pe[qk_rope_head_dim]``, never per-head K/V: ``(r + dr) * dtype_size`` bytes per
position and layer (DeepSeek-V2-Lite: 576 * 2 = 1152 bytes in bf16, against 16 heads *
(192 + 128) * 2 = 10240 bytes for an expanded K/V cache).

Both live in one buffer ``[B, 1, capacity, r + dr]``: the absorbed decode attends over
``[c_kv, k_pe]`` as keys and ``c_kv`` as values, which are then views of that buffer (no
concatenation of the whole cache per step).
"""

from __future__ import annotations

import mlx.core as mx

from mlxllm.cache import _Single


class LatentCache(_Single):
    """Cache protocol (``offset``, ``update_and_fetch``, ``state``, ``trim``) over the latent.

    Grows in blocks of ``step`` positions, like ``KVCache``.
    """

    step = 256

    def __init__(self):
        self.buffer: mx.array | None = None  # [B, 1, capacity, r + dr]
        self.rank = 0  # r: where c_kv ends and k_pe starts in the last axis
        self.offset = 0

    def _grow(self, B: int, L: int, width: int, dtype: mx.Dtype) -> int:
        """Make room for ``L`` more positions; return the new offset."""
        need = self.offset + L
        if self.buffer is None or need > self.buffer.shape[2]:
            n_new = ((need + self.step - 1) // self.step) * self.step
            grow = n_new - (0 if self.buffer is None else self.offset)  # after dropping the tail
            block = mx.zeros((B, 1, grow, width), dtype)
            if self.buffer is None:
                self.buffer = block
            else:
                # drop the unused tail before growing so the buffer stays [0, offset) + block
                self.buffer = mx.concatenate([self.buffer[:, :, : self.offset], block], axis=2)
        return need

    def update_and_fetch(self, c_kv: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``c_kv[B, 1, L, r]`` and ``k_pe[B, 1, L, dr]``; return all stored
        ``c_kv[B, 1, offset + L, r]`` and ``k_pe[B, 1, offset + L, dr]``."""
        B, _, L, r = c_kv.shape
        need = self._grow(B, L, r + k_pe.shape[-1], c_kv.dtype)
        self.rank = r
        self.buffer[:, :, self.offset : need, :r] = c_kv
        self.buffer[:, :, self.offset : need, r:] = k_pe
        self.offset = need
        return self.buffer[:, :, :need, :r], self.buffer[:, :, :need, r:]

    def claim(self, B: int, L: int, width: int, dtype: mx.Dtype, rank: int) -> tuple[mx.array, int]:
        """Make room for ``L`` positions of joint rows ``[c_kv, k_pe]`` (``r = rank``) and count
        them stored; return ``(buffer, first position)``. The caller writes those rows into the
        buffer itself (the CUDA decode kernel writes the row in place: no copy of the cache)."""
        need = self._grow(B, L, width, dtype)
        self.rank = rank
        start, self.offset = self.offset, need
        return self.buffer, start

    @property
    def joint(self) -> mx.array:
        """``[c_kv, k_pe]`` of all stored positions, ``[B, 1, offset, r + dr]``."""
        return self.buffer[:, :, : self.offset]

    @property
    def state(self) -> list[mx.array]:
        if self.buffer is None:
            return []
        return [self.joint]

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def load(self, state: list[mx.array]) -> None:
        """Hold ``state`` (``[joint]``, ``[1, 1, n, r + dr]``, e.g. from a prefix store) as the
        first ``n`` positions (``rank`` is set again by the next write, which precedes any
        read)."""
        (self.buffer,) = state
        self.offset = self.buffer.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held for ``offset`` positions: ``B * offset * (r + dr) * dtype_size``."""
        if self.buffer is None:
            return 0
        B, _, _, width = self.buffer.shape
        return B * self.offset * width * self.buffer.dtype.size
