"""The serving engine: continuous batching, chunked prefill and a prefix store (``core.py``),
per-request consumers for threads and asyncio (``handle.py``), the radix-tree prefix store
(``prefix.py``). The HTTP server sits on top of it."""

from mlxllm.engine.core import Engine, EngineStats, Event, QueueFull, Request, tokens_of
from mlxllm.engine.handle import Handle
from mlxllm.engine.prefix import PrefixStore

__all__ = ["Engine", "EngineStats", "Event", "Handle", "PrefixStore", "QueueFull", "Request",
           "tokens_of"]  # fmt: skip
