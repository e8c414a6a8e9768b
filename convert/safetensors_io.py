"""Safetensors read and write, one tensor at a time.

Reading goes through ``mx.load`` (lazy: evaluating one tensor reads only its bytes), after the
header has been validated so that a truncated file is reported before any work starts.
Writing streams: the header is computed from lazy shapes and dtypes, then each tensor is
evaluated and written in turn, so memory holds one tensor, not one shard.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxllm.errors import MlxllmError

DTYPE_NAMES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
}
FP8_NAMES = ("F8_E4M3", "F8_E4M3FN")


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size.

    Raises:
        MlxllmError: the file is not safetensors or is shorter than its header says.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MlxllmError(f"{path} is not a safetensors file (too short); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise MlxllmError(f"{path} has a corrupt header (truncated file?); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MlxllmError(f"{path} has a corrupt header; re-download it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MlxllmError(
            f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); re-download it"
        )
    return header


def fp8_names(header: dict) -> set[str]:
    """Tensors stored as float8 e4m3; ``mx.load`` hands them over as their uint8 bytes."""
    return {k for k, v in header.items() if k != "__metadata__" and v["dtype"] in FP8_NAMES}


class StreamingWriter:
    """Write tensors into safetensors shards of at most ``max_bytes`` each, streaming.

    ``add(name, lazy_array)`` only records; ``flush_shard`` (called when a shard is full, and by
    ``close``) writes one file, evaluating one tensor at a time. Returns the weight map.
    """

    def __init__(self, folder: Path, max_bytes: int, metadata: dict | None = None, on_write=None):
        self.folder = folder
        self.on_write = on_write or (lambda name: None)  # called after each tensor is written
        self.max_bytes = max_bytes
        self.metadata = {"format": "mlx", **(metadata or {})}
        self.pending: list[tuple[str, mx.array]] = []
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, array: mx.array) -> None:
        if array.dtype not in DTYPE_NAMES:
            raise MlxllmError(f"cannot store tensor {name} of dtype {array.dtype}")
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self.flush_shard()
        self.pending.append((name, array))
        self.pending_bytes += array.nbytes

    def flush_shard(self) -> None:
        if not self.pending:
            return
        index = len(self.shards)
        path = self.folder / f"model-{index:05d}.safetensors"
        header, offset = {}, 0
        for name, a in self.pending:
            header[name] = {
                "dtype": DTYPE_NAMES[a.dtype],
                "shape": list(a.shape),
                "data_offsets": [offset, offset + a.nbytes],
            }
            offset += a.nbytes
        header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        names = [n for n, _ in self.pending]
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i, name in enumerate(names):
                a, self.pending[i] = self.pending[i][1], None  # the file holds it from now on
                f.write(_to_bytes(a))
                del a
                mx.clear_cache()  # freed buffers would otherwise pile up in MLX's cache
                self.on_write(name)
        self.shards.append(names)
        self.total_bytes += offset
        self.pending, self.pending_bytes = [], 0

    def close(self) -> dict[str, str]:
        """Write what is left, rename shards to the HF ``-of-`` pattern, return the weight map."""
        self.flush_shard()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            (self.folder / f"model-{i:05d}.safetensors").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        return weight_map


def _to_bytes(a: mx.array) -> memoryview | bytes:
    mx.eval(a)  # one tensor at a time: this is what bounds the converter's memory
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)  # numpy has no bfloat16; the bytes are the same
    return memoryview(np.ascontiguousarray(np.asarray(a)))  # a transposed view is not C-order


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    weight_map = dict(sorted(weight_map.items()))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def tensor_names(headers: Iterable[dict]) -> list[str]:
    return [k for h in headers for k in h if k != "__metadata__"]
