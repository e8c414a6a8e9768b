"""The models a server holds: loaded on first use, kept for ``keep_alive`` seconds after their
last request, unloaded least recently used first when a new one would not fit in memory.

A request names its model (alias, folder or Hub repo id, as ``mlxllm`` commands take them); no
name, or the name of the server's default model, is the default. Loading happens in a worker
thread (the event loop keeps serving) and a model that fails to load is one error for that
request, never the server's end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from pathlib import Path

import mlx.core as mx

from mlxllm.errors import MlxllmError
from mlxllm.server.openai import ApiError


class Served:
    """One loaded model, its tokenizer and its running engine."""

    def __init__(self, name: str, model, tokenizer, **engine_kw):
        from mlxllm.engine import Engine

        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.engine = Engine(model, tokenizer.eos_token_ids, **engine_kw)
        self.created = int(time.time())
        self.used = time.monotonic()
        # the engine's model: with speculation, the draft model's or MTP layer's weights too
        self.nbytes = sum(v.nbytes for v in _leaves(self.engine.model.parameters()))

    @property
    def held(self) -> int:
        """Bytes this model holds: weights, the caches its requests may reach, its prefix
        store."""
        return self.nbytes + self.engine.reserved() + self.engine.store.nbytes


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif isinstance(tree, mx.array):
        yield tree


def _clear_streams() -> None:
    mx.synchronize()
    mx.clear_streams()


def _weights_bytes(path: Path, dtype=None) -> int:
    """Bytes the checkpoint's weights take once loaded: floating tensors in the compute dtype
    (the loader casts them), the rest as stored; read from the safetensors headers."""
    import json
    import struct

    from mlxllm.loader import default_dtype

    size = (dtype or default_dtype()).size
    total = 0
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in t["shape"]:
                count *= d
            stored = t["data_offsets"][1] - t["data_offsets"][0]
            total += count * size if t["dtype"] in ("F16", "BF16", "F32", "F64") else stored
    return total


class Models:
    """Loaded models by name (see module doc).

    Args:
        default: the model requests get when they name none (None: they must name one).
        keep_alive: seconds an idle model stays loaded (the default model stays always).
        memory_limit: bytes the models may hold at once, weights and caches (default: 3/4 of
            device memory).
        engine_kw: settings for each model's ``Engine``.
    """

    def __init__(self, default: Served | None = None, keep_alive: float = 300.0,
                 memory_limit: int | None = None, dtype=None, **engine_kw):  # fmt: skip
        from mlxllm.engine.core import default_budget

        self.default = default
        self.keep_alive = keep_alive
        self.memory_limit = memory_limit if memory_limit is not None else default_budget()
        self.dtype, self.engine_kw = dtype, engine_kw
        self.loaded: dict[str, Served] = {}
        # requests the routes are still reading and tokenizing (``arrive``): an idle engine
        # waits for them, so that a burst is prefilled together (``Engine.gather``)
        self.arriving = 0
        if default is not None:
            self._hold(default)
        self._lock = asyncio.Lock()
        # every load in one thread: MLX streams belong to a thread, and a load whose arrays
        # were partly made in another worker thread failed ("no Stream(cpu, 0) in current
        # thread")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlxllm-load")

    def _hold(self, served: Served) -> None:
        self.loaded[served.name] = served
        served.engine.arrivals = lambda: self.arriving

    @contextlib.contextmanager
    def arrive(self):
        """Around a route's reading of a request up to its submission (event loop only)."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def get(self, name) -> Served:
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", "model")
        if not name or (self.default is not None and name == self.default.name):
            if self.default is None:
                raise ApiError(400, "name a model: this server has no default", "model")
            served = self.default
        elif name in self.loaded:
            served = self.loaded[name]
        else:
            async with self._lock:  # one load at a time
                served = self.loaded.get(name) or await self._load(name)
        served.used = time.monotonic()
        return served

    async def _load(self, name: str) -> Served:
        from mlxllm.loader import resolve

        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._loader, resolve, name)
        except (MlxllmError, OSError) as e:
            loaded = ", ".join(self.loaded) or "none"
            raise ApiError(404, f"model {name!r} not found ({e}); loaded: {loaded}", "model",
                           kind="not_found_error") from None  # fmt: skip
        self._make_room(_weights_bytes(Path(path), self.dtype))

        def build():
            # in one thread: lazily loaded weights are evaluated where they were made
            from mlxllm.loader import load

            model, tok = load(path, dtype=self.dtype)
            served = Served(name, model, tok, **self.engine_kw)
            served.engine.start()
            return served

        try:
            served = await loop.run_in_executor(self._loader, build)
        except (MlxllmError, OSError, ValueError) as e:
            raise ApiError(400, f"model {name!r} failed to load: {e}", "model") from None
        self._hold(served)
        return served

    def _make_room(self, need: int) -> None:
        """Unload idle models, least recently used first, until ``need`` more bytes fit beside
        what the others hold (weights, caches and prefix stores)."""
        held = {s.name: s.held for s in self.loaded.values()}
        for served in sorted(self.loaded.values(), key=lambda s: s.used):
            if sum(held.values()) + need <= self.memory_limit:
                return
            if served is self.default or served.engine.busy:
                continue
            self.unload(served.name)
            held.pop(served.name)
        held = sum(held.values())
        if held + need > self.memory_limit:
            raise ApiError(503, f"not enough memory for this model ({need / 2**30:.1f} GiB) "
                           "beside the busy ones; retry later", "model")  # fmt: skip

    def unload(self, name: str) -> None:
        served = self.loaded.pop(name, None)
        if served is not None:
            served.engine.stop()

    def expire(self) -> list[str]:
        """Unload models idle for more than ``keep_alive`` seconds; returns their names."""
        now, gone = time.monotonic(), []
        for served in list(self.loaded.values()):
            idle = now - served.used > self.keep_alive and not served.engine.busy
            if served is not self.default and idle:
                self.unload(served.name)
                gone.append(served.name)
        if gone:
            mx.clear_cache()
        return gone

    def start(self) -> None:
        if self.default is not None:
            self.default.engine.start()

    def stop(self) -> None:
        for name in list(self.loaded):
            self.unload(name)
        # the loader thread's streams go before it does (left over, they abort the exit)
        self._loader.submit(_clear_streams).result()
        self._loader.shutdown(wait=True)

    def local(self) -> list[str]:
        """Model folders in the Hugging Face cache (repo ids), for ``/v1/models``."""
        try:
            from huggingface_hub import scan_cache_dir

            repos = scan_cache_dir().repos
        except Exception:  # no cache yet, or one it cannot read: nothing local to list
            return []
        return sorted(r.repo_id for r in repos if r.repo_type == "model")
