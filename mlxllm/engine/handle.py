"""Per-request consumers of a running engine: a thread or an asyncio task reads its events.

``Handle`` is what ``Engine.open`` returns: iterate it (``for ev in h`` in a thread, ``async for
ev in h`` in asyncio) to get the request's ``Event``s as the engine thread produces them. With a
tokenizer it also turns tokens into text (``ev.text``: UTF-8-safe deltas) and applies stop
strings: the text before a stop string is the last delta, the request is cancelled in the engine,
and nothing after it is ever delivered. Events queue up in the handle (they are small), so a slow
reader never stalls the engine; ``cancel()`` (or leaving an ``async for`` early) frees the
request's place in the batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from mlxllm.engine.core import Event
from mlxllm.generation.stream import split_at_stop


class Handle:
    def __init__(self, engine, tokenizer=None, stop: list[str] | tuple = ()):
        self.engine = engine
        self.id: int | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._detok = tokenizer.detokenizer() if tokenizer is not None else None
        self._stops = [s for s in stop if s]
        if self._stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self._pending = ""  # text held back while it could start a stop string
        self.done = False
        self.stop_matched: str | None = None  # the stop string that ended the request

    # engine thread
    def _push(self, ev: Event) -> None:
        with self._cond:
            self._events.append(ev)
            self._cond.notify_all()
            loop, ready = self._loop, self._ready
        if loop is not None:
            loop.call_soon_threadsafe(ready.set)

    def cancel(self) -> None:
        if not self.done and self.id is not None:
            self.engine.cancel(self.id)

    def _text(self, ev: Event) -> Event | None:
        """Fill in ``ev.text``; returns the event to deliver (None: held back entirely)."""
        if self._detok is None:
            return ev
        final = ev.finish_reason is not None
        if ev.token is not None and not (final and ev.finish_reason == "stop"):
            self._pending += self._detok.add(ev.token)
        if final:
            self._pending += self._detok.finalize()
        found = [(self._pending.find(s), s) for s in self._stops if s in self._pending]
        out, held, cut = split_at_stop(self._pending, self._stops, final=final)
        self._pending = held
        if cut:
            self.stop_matched = min(found)[1]
            self.engine.cancel(self.id, "stop")
            ev.finish_reason, ev.token = "stop", None
        ev.text = out
        return ev

    def _take(self) -> Event | None:
        ev = self._events.popleft()
        ev = self._text(ev)
        if ev is not None and ev.finish_reason is not None:
            self.done = True
        return ev

    def __iter__(self):
        while not self.done:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                ev = self._take()
            yield ev

    async def __aiter__(self):
        with self._cond:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        try:
            while not self.done:
                with self._cond:
                    ev = self._take() if self._events else None
                    if ev is None:
                        self._ready.clear()
                if ev is None:
                    await self._ready.wait()
                    continue
                yield ev
        finally:
            self.cancel()  # the reader left early (a client disconnected): free the slot
