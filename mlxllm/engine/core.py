"""The serving engine: continuous batching, chunked prefill between decode steps, prefix reuse.

Requests (token ids and their own sampling settings) wait in a bounded queue, are admitted when
their cache fits the memory budget, and have their prompt prefilled in chunks, one chunk per
engine step, so that running streams keep producing a token every step. A prefilled request
joins the running batch: every step is then ONE model call over all running requests (a batch
cache, ``cache/batch.py``: rows left-padded, KV or MLA latent), and each request leaves the batch
when it is done or cancelled. The cache states of prompts and of finished requests go to a
``PrefixStore``; a new request starts from its longest stored prefix and prefills only the rest.

``Engine.step()`` is the whole scheduler, synchronous and single-threaded: tests drive it
directly. ``submit``/``cancel`` may be called from any thread, and ``start()`` runs the steps in
a background thread; ``Handle`` objects deliver each request's events to a thread or an asyncio
task (``engine/handle.py``). The engine is text-free: token ids in, token events out.

Extension points (not used yet): ``_decode`` returns one token per row and the emission loop
takes a list per row, so a speculative step that verifies several tokens per call plugs in
there; ``_prefill_chunk`` is where embeddings at placeholder positions would enter.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import threading
import time

import mlx.core as mx
import numpy as np

from mlxllm.cache.batch import batch_caches
from mlxllm.engine.prefix import PrefixStore, common_prefix
from mlxllm.errors import InvalidArgument, MlxllmError
from mlxllm.generation.sample import check_sampling, distribution, make_sampler
from mlxllm.generation.sample import repetition_penalty as make_rep_penalty
from mlxllm.models.base import context_length

FOLLOW_MIN = 64  # shared uncached prompt tokens that make a request wait for another's prefill
GATHER_TICK = 0.005  # seconds without a new request that end a burst (see ``Engine.gather``)


def query_bucket(n: int) -> int:
    """Queries of a prefill call of ``n`` positions when shapes are bucketed: a multiple of 64
    up to 512, of 256 beyond (at most 63 or 255 padding queries; 14 sizes up to 2048)."""
    q = 64 if n <= 512 else 256
    return -(-n // q) * q


def _floor_bucket(n: int) -> int:
    """The largest bucket size not above ``n`` (``n`` itself below the smallest)."""
    if n < 64:
        return n
    return n // 64 * 64 if n < 768 else n // 256 * 256


class QueueFull(MlxllmError):
    """The engine's waiting queue is full: retry later or raise ``max_queued``."""


@dataclasses.dataclass
class Request:
    """One generation request (token ids; text is the caller's, see ``engine/handle.py``).

    Args:
        prompt: token ids (at least one).
        max_tokens: most new tokens.
        temperature, top_p, top_k, min_p, repetition_penalty: sampling, as in ``generate``.
        seed: the request's own random stream (``mx.random.key(seed)``): the same request with
            the same seed samples the same tokens whatever else runs beside it.
        stop_token_ids: ids that end the request besides the engine's eos ids.
        logprobs: None, or how many top alternatives to report with each token's log
            probability (0: only the chosen token's).
        logits_processors: called on each step's logits of this request with its ids so far
            (prompt and generated), e.g. a grammar's mask; they run before sampling.
    """

    prompt: list[int]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    logits_processors: tuple = ()  # p(history ids, logits[1, V]) -> logits, in the engine thread


@dataclasses.dataclass
class Event:
    """A token of request ``request_id`` (or its end, ``token=None``).

    ``finish_reason``: None while it runs, then "stop" (an eos or stop id, which is the event's
    token), "length" (max_tokens), "cancelled" or "error" (``error`` says why).
    """

    request_id: int
    token: int | None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens that came from the prefix store
    generation_tokens: int = 0
    error: str | None = None
    text: str = ""  # the token's text, filled in by a ``Handle`` that has a tokenizer


@dataclasses.dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    cached_tokens: int = 0  # of those, taken from the prefix store
    prefill_tokens: int = 0  # computed by prefill
    decode_steps: int = 0
    generated_tokens: int = 0


class _Seq:
    """A request inside the engine."""

    def __init__(self, rid: int, req: Request, eos: set[int]):
        self.id, self.req = rid, req
        self.stop_ids = eos | set(req.stop_token_ids)
        self.sampler = make_sampler(req.temperature, req.top_p, req.top_k, req.min_p)
        self.dist = distribution(req.temperature, req.top_p, req.top_k, req.min_p)
        self.greedy = req.temperature == 0
        self.processors = (
            [make_rep_penalty(req.repetition_penalty)] if req.repetition_penalty else []
        ) + list(req.logits_processors)
        self.seed = req.seed if req.seed is not None else secrets.randbits(63)
        self.key = None  # made in the engine's thread (MLX streams belong to one thread)
        self.generated: list[int] = []
        self.cached = 0  # prompt tokens from the prefix store
        self.calls = 0  # decode calls that fed this row a token
        self.unread = 0  # decode calls whose token for this row is not read yet
        self.finished = False
        self.known: list[int] = []  # speculative: tokens of the row not yet in the cache

    @property
    def fed(self) -> int:
        """Generated tokens in the cache: the first call feeds the last prompt token, each
        later one the token before."""
        return min(max(self.calls - 1, 0), len(self.generated))

    @property
    def total(self) -> int:
        """Positions this request may hold at most (its cache reservation)."""
        return len(self.req.prompt) + self.req.max_tokens


class _Prefill:
    """Requests prefilled together: the rows of one batch cache, right-aligned.

    Row ``b`` holds ``prompt[:-1]`` at cache positions ``[left[b], left[b] + len(prompt) - 1)``
    (its last prompt token is its first input in the running batch), so all rows finish at
    the same position. Each row computes the same number ``R`` of last positions: a row with
    fewer new tokens recomputes the end of its cached prefix, or, without enough of one, is
    padded on the left (pads are masked: they cost compute, not correctness). Rows join while
    the group has not run, if ``R`` stays within twice every row's own new tokens.
    """

    def __init__(self, seq: _Seq, states: list):
        self.seqs = [seq]
        self.states = [states]  # per row: the prefix store's per-layer states ([] if none)
        self.caches = None  # per-layer batch caches, made by the first chunk (``build``)
        # requests that share a long uncached prefix with a row here: they wait until this
        # group's prompts are in the prefix store and start from there
        self.followers: list[_Seq] = []

    def _remaining(self, seqs) -> list[int]:
        return [len(s.req.prompt) - 1 - s.cached for s in seqs]

    @property
    def offset(self) -> int:
        return self.caches[0].offset if self.caches is not None else 0

    @property
    def end(self) -> int:
        left = self.caches[0].left
        return max(p + len(s.req.prompt) - 1 for p, s in zip(left, self.seqs, strict=True))

    @property
    def todo(self) -> int:
        return self.end - self.offset

    def admits(self, seq: _Seq, limit: int) -> bool:
        if self.caches is not None or len(self.seqs) >= limit:
            return False
        r = self._remaining(self.seqs + [seq])
        return max(r) <= 2 * min(r)

    def add(self, seq: _Seq, states: list) -> None:
        self.seqs.append(seq)
        self.states.append(states)

    def build(self, model, stats: EngineStats, bucket_keys: bool = False) -> None:
        """The batch caches: every row's reused prefix, right-aligned (see class doc)."""
        R = max(self._remaining(self.seqs))
        rows, reuse = [], []
        for seq, states in zip(self.seqs, self.states, strict=True):
            keep = max(0, len(seq.req.prompt) - 1 - R)  # cached positions this row keeps
            keep = min(keep, seq.cached)
            stats.cached_tokens -= seq.cached - keep  # recomputed: not reused after all
            seq.cached = keep
            caches = model.make_cache()
            if keep:
                for c, state in zip(caches, states, strict=True):
                    c.load([a[:, :, :keep] for a in state])
            rows.append(caches)
            reuse.append(keep)
        self.caches = batch_caches(rows)
        for c in self.caches:
            c.bucket_keys = bucket_keys
        S = self.caches[0].offset
        left = [S - k if k else S + R - (len(s.req.prompt) - 1)
                for k, s in zip(reuse, self.seqs, strict=True)]  # fmt: skip
        for c in self.caches:
            c.left = list(left)
        self.states = None

    def window(self, n: int) -> list[list[int]]:
        """The ids at positions ``[offset, offset + n)`` of every row (0 in its padding)."""
        out = []
        for p, s in zip(self.caches[0].left, self.seqs, strict=True):
            ids = s.req.prompt
            out.append([ids[i - p] if i >= p else 0 for i in range(self.offset, self.offset + n)])
        return out

    def real_tokens(self, n: int) -> int:
        """Prompt tokens (not pads) among the last ``n`` positions run."""
        hi = self.offset
        return sum(max(0, hi - max(p, hi - n)) for p in self.caches[0].left)

    def remove(self, seq: _Seq) -> None:
        b = self.seqs.index(seq)
        self.seqs.pop(b)
        if self.caches is None:
            self.states.pop(b)
            return
        for c in self.caches:
            c.filter([i for i in range(len(self.seqs) + 1) if i != b])


def default_budget() -> int:
    """Bytes for caches when the caller gives none: 3/4 of the device's memory (Metal's
    recommended working set, the GPU's memory on CUDA, RAM on the CPU) less what is already in
    use (the weights)."""
    total = 0
    try:
        info = mx.device_info()
        total = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
    except Exception:  # an older MLX without device_info: fall through to RAM
        total = 0
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, int(0.75 * total) - mx.get_active_memory())


class Engine:
    """Continuous batching over one model (see module doc).

    Args:
        model: a built mlxllm model (any family).
        eos_token_ids: ids that end every request (the tokenizer's).
        max_batch: most requests decoding or prefilling at once.
        prefill_chunk: most prompt tokens per prefill call (bounds activation memory and how
            long the running streams wait per step); default 2048 on a GPU, 512 on the CPU
            (where 2048 tokens of a 0.5B model hold the streams for seconds).
        prefill_batch: most new requests (without a cached prefix) prefilled in one call.
        memory_budget: bytes for all caches (running batch, prefills, prefix store); default
            ``default_budget()``.
        prefix_cache_bytes: most bytes the prefix store keeps (default: the budget; it gives
            way to running requests); 0 turns prefix reuse off.
        max_queued: requests that may wait for admission; more raise ``QueueFull``.
        allow_long_prompt: admit prompts longer than the model's context.
        draft: a draft model (same tokenizer) for speculative decoding of every request,
            ``num_draft`` tokens per row and step, batched (see ``_speculate``).
        mtp: an MTP layer (``speculative.mtp``: a checkpoint's own or a trained head) to draft
            with instead of a draft model.
        shape_buckets: give model calls of several positions shapes from a small set: prefill
            chunks padded at the end to ``query_bucket`` queries (the padding's cache writes
            are trimmed) and attention over the keys up to the end of the cache buffer (the
            rest masked). The output is the same; what it saves is MLX's per-shape set-up on
            CUDA (~70 ms per new shape for a 7B model: a cuDNN attention graph and more),
            paid on nearly every request at exact shapes. Default: on under CUDA only.
        gather: when the background thread wakes from idle, the most seconds it waits for
            the rest of a burst of requests (while they keep arriving, or ``arrivals()`` says
            more are on their way), so that they are prefilled together and all get their
            first token after one prefill instead of queueing behind each other's. A lone
            request waits one tick (``GATHER_TICK``). 0 turns it off.
        arrivals: a callable giving how many requests are being prepared for ``submit`` by
            the caller right now (the server counts requests it is still parsing).
        pipeline: queue each decode call before reading the tokens of the one before, so that
            the device computes while Python hands tokens out. Default: on a GPU only. On
            MLX's CPU backend queueing a call runs most of it before returning (measured: a
            0.5B decode call's ``async_eval`` returned after 0.25-0.43 s of its ~0.3 s), so
            there pipelining only delays every token by one step.
    """

    def __init__(
        self,
        model,
        eos_token_ids=(),
        *,
        max_batch: int = 32,
        prefill_chunk: int | None = None,
        prefill_batch: int = 8,
        memory_budget: int | None = None,
        prefix_cache_bytes: int | None = None,
        max_queued: int = 256,
        allow_long_prompt: bool = False,
        draft=None,
        num_draft: int = 3,
        mtp=None,
        shape_buckets: bool | None = None,
        gather: float = 0.05,
        arrivals=None,
        pipeline: bool | None = None,
    ):
        if shape_buckets is None:
            from mlxllm.kernels import on_cuda

            shape_buckets = on_cuda()
        self.shape_buckets = shape_buckets
        if prefill_chunk is None:
            prefill_chunk = 2048 if mx.default_device() == mx.gpu else 512
        if min(max_batch, prefill_chunk, prefill_batch) < 1 or max_queued < 0:
            raise InvalidArgument(
                "max_batch, prefill_chunk and prefill_batch must be >= 1, max_queued >= 0"
            )
        speculate = draft is not None or mtp is not None
        if speculate:
            from mlxllm.speculative import DraftPair, MTPPair

            if num_draft < 1:
                raise InvalidArgument(f"num_draft {num_draft}: use 1 or more")
            if draft is not None and mtp is not None:
                raise InvalidArgument("pass a draft model or an MTP layer, not both")
            model = DraftPair(model, draft) if draft is not None else MTPPair(model, mtp)
        self.model = model
        self.window = num_draft + 1 if speculate else 0  # positions per row and step
        self.eos = set(eos_token_ids)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = prefill_batch
        self.budget = default_budget() if memory_budget is None else int(memory_budget)
        store_bytes = self.budget if prefix_cache_bytes is None else int(prefix_cache_bytes)
        self.store = PrefixStore(min(store_bytes, self.budget))
        self.max_queued = max_queued
        self.context = None if allow_long_prompt else context_length(model.config)
        self.stats = EngineStats()
        self._ids = 0
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._cancels: dict[int, str] = {}
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self.rows: list[_Seq] = []  # the running batch, in cache row order
        self._caches = None  # per-layer batch caches of self.rows
        self._inputs: mx.array | None = None  # [B] next input token of each row
        self._unread = None  # (tokens [B], logprob arrays, rows) of the last decode call
        self._bpt: int | None = None
        self._handles: dict = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.gather, self.arrivals = gather, arrivals
        self.pipeline = mx.default_device() == mx.gpu if pipeline is None else pipeline
        # MLX streams belong to the thread that made them: weights still lazy (a model just
        # loaded) are evaluated here, in the caller's thread (the engine's thread cannot), and
        # every array of a request is made in the thread that runs the steps
        mx.eval(model.parameters())
        self._bytes_per_token()

    # ---- the thread-safe front -----------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse a request that can never run (``InvalidArgument``, one line)."""
        check_sampling(req.temperature, req.top_p, req.top_k, req.min_p,
                       req.repetition_penalty, req.seed, req.max_tokens)  # fmt: skip
        if not req.prompt:
            raise InvalidArgument("the prompt is empty; pass at least one token")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise InvalidArgument(f"logprobs {req.logprobs}: use 0 to 20 alternatives")
        if self.context and len(req.prompt) > self.context:
            raise InvalidArgument(
                f"the prompt is {len(req.prompt)} tokens, longer than the model's context of "
                f"{self.context}; shorten it (or start the engine with allow_long_prompt)"
            )

    def submit(self, req: Request, handle=None) -> int:
        """Queue ``req``; returns its id. Raises ``QueueFull`` when ``max_queued`` wait."""
        self.check(req)
        with self._lock:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (max_queued="
                    f"{self.max_queued}); retry later or raise max_queued"
                )
            self._ids += 1
            seq = _Seq(self._ids, req, self.eos)
            if handle is not None:
                self._handles[seq.id] = handle
            self._waiting.append(seq)
            self._wake.notify_all()
            return seq.id

    def open(self, req: Request, tokenizer=None, stop: list[str] | tuple = ()):
        """Submit ``req`` and return its ``Handle`` (events for a thread or asyncio task; with
        a tokenizer, text deltas and ``stop`` strings). Needs ``start()`` (or someone calling
        ``step()``) to make progress."""
        from mlxllm.engine.handle import Handle

        h = Handle(self, tokenizer, stop)
        with self._lock:  # the id is known before the engine thread can push to it
            h.id = self.submit(req, handle=h)
        return h

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """End a request at the next step; its cache rows are freed then (any thread)."""
        with self._lock:
            self._cancels[request_id] = reason
            self._wake.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self.rows or self._cancels)

    # ---- the scheduler -------------------------------------------------------------------

    def step(self) -> list[Event]:
        """One scheduler iteration: cancels, admission, one decode call over the running batch,
        one prefill chunk; returns the events it produced (also given to the handles)."""
        events: list[Event] = []
        self._apply_cancels(events)
        self._admit(events)
        pipelined = self.pipeline and not any(s.processors for s in self.rows)
        if self.window:
            self._speculate(events)
        elif pipelined and not self._prefilling and all(s.calls for s in self.rows):
            # the next call is queued before this step's tokens are read: the device computes
            # while Python emits; rows whose unread token is their last leave first
            self._retire([s for s in self.rows if self._last_unread(s)], store=True)
            launched = self._decode()
            self._emit(events)
            self._unread = launched
        else:
            # the tokens of this call are read (and delivered) before the next call: logits
            # processors read each row's history; a prefill chunk follows, and no stream
            # should wait for it with a token already computed; a row that just joined gets
            # its first token without waiting for the next call to be queued (on MLX's CPU
            # backend, queueing a call waits for much of the one before)
            self._emit(events)
            self._unread = self._decode()
            self._emit(events)
        self._deliver(events)  # before the prefill chunk, which makes no events
        self._prefill_step()
        return events

    def _deliver(self, events: list[Event]) -> None:
        """Hand ``events`` to their requests' handles."""
        for ev in events:
            h = self._handles.get(ev.request_id)
            if h is not None:
                h._push(ev)
                if ev.finish_reason is not None:
                    self._handles.pop(ev.request_id, None)

    def _last_unread(self, s: _Seq) -> bool:
        return s.unread > 0 and len(s.generated) + s.unread >= s.req.max_tokens

    def _apply_cancels(self, events: list[Event]) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, {}
            waiting = [s for s in self._waiting if s.id in cancels]
            for s in waiting:
                self._waiting.remove(s)
        if not cancels:
            return
        gone = []
        for group in list(self._prefilling):
            for s in [s for s in group.followers if s.id in cancels]:
                group.followers.remove(s)
                gone.append(s)
            for s in [s for s in group.seqs if s.id in cancels]:
                group.remove(s)
                gone.append(s)
            if not group.seqs:
                self._prefilling.remove(group)
                self._release(group)
        rows = [s for s in self.rows if s.id in cancels]
        self._retire(rows, store=False)
        for s in waiting + gone + rows:
            s.finished = True
            events.append(self._event(s, None, cancels[s.id]))
        if rows or gone:
            # evaluate the smaller buffers now so the cancelled rows' memory is freed at once
            caches = (self._caches or []) + [c for g in self._prefilling for c in g.caches or []]
            mx.eval([c.state for c in caches])

    def _prefill_seqs(self) -> list[_Seq]:
        return [s for g in self._prefilling for s in g.seqs]

    def _bytes_per_token(self) -> int:
        if self._bpt is None:
            # one token through a fresh cache: every family's per-position cache size
            cache = self.model.make_cache()
            self.model(mx.array([[0]]), cache=cache)
            mx.eval([c.state for c in cache])
            self._bpt = sum(c.nbytes for c in cache)
        return self._bpt

    def reserved(self, extra: list[_Seq] = ()) -> int:
        """Bytes the running and prefilling requests (and ``extra``) may reach: rows padded to
        the longest, each at its full length, in blocks of the cache's growth step."""
        seqs = self.rows + self._prefill_seqs() + list(extra)
        if not seqs:
            return 0
        longest = max(s.total for s in seqs) + 256
        return len(seqs) * longest * self._bytes_per_token()

    def _admit(self, events: list[Event]) -> None:
        while True:
            with self._lock:
                running = len(self.rows) + len(self._prefill_seqs())
                if not self._waiting or running >= self.max_batch:
                    return
                seq = self._waiting[0]
            need = self.reserved([seq])
            if need + self.store.nbytes > self.budget:
                self.store.evict(limit=max(0, self.budget - need))  # the store gives way
            if need + self.store.nbytes > self.budget:
                if self.rows or self._prefilling:
                    return  # wait for running requests to finish
                with self._lock:
                    self._waiting.popleft()
                seq.finished = True
                events.append(self._event(seq, None, "error", error=(
                    f"the request needs {need / 2**30:.2f} GiB of cache (prompt "
                    f"{len(seq.req.prompt)} + max_tokens {seq.req.max_tokens}) but the memory "
                    f"budget is {self.budget / 2**30:.2f} GiB; lower max_tokens or shorten "
                    "the prompt, or give the engine a larger memory_budget")))  # fmt: skip
                continue
            with self._lock:
                self._waiting.popleft()
            self._start_prefill(seq)

    def _start_prefill(self, seq: _Seq) -> None:
        prompt = seq.req.prompt
        # the last prompt token is the row's first input in the batch: never take it from the
        # store, so that every request runs at least one token
        n, states = self.store.lookup(prompt, limit=len(prompt) - 1)
        leader = self._leader(seq, n)
        if leader is not None:
            leader.followers.append(seq)
            return
        seq.key = mx.random.key(seq.seed)
        seq.cached = n
        self.stats.prompt_tokens += len(prompt)
        self.stats.cached_tokens += n
        last = self._prefilling[-1] if self._prefilling else None
        if last is not None and last.admits(seq, self.prefill_batch):
            last.add(seq, states)
        else:
            self._prefilling.append(_Prefill(seq, states))

    def _leader(self, seq: _Seq, cached: int) -> _Prefill | None:
        """The prefilling group worth waiting for: one whose row shares at least
        ``FOLLOW_MIN`` more prompt tokens with ``seq`` than the store holds, and at least half
        of what ``seq`` would compute. Requests with one long new prefix (an agent's sub-tasks
        under one system prompt, arriving together) then compute it once, not once each."""
        if not self.store.max_bytes:
            return None
        ids = np.asarray(seq.req.prompt[:-1])
        todo = len(ids) - cached
        best, gain = None, 0
        for group in self._prefilling:
            for other in group.seqs:
                shared = common_prefix(ids, np.asarray(other.req.prompt[:-1])) - cached
                if shared > gain:
                    best, gain = group, shared
        return best if gain >= FOLLOW_MIN and 2 * gain >= todo else None

    def _prefill_step(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens (pads included), in order of arrival;
        when nothing was decoding, every admitted prompt, so that requests arriving together
        start together. A group whose prompts are in its cache joins the batch."""
        spent, idle = 0, not self.rows
        while self._prefilling:
            if not idle and spent >= self.prefill_chunk:
                return  # the running streams get their next token first
            group = self._prefilling[0]
            if group.caches is None:
                group.build(self.model, self.stats, self.shape_buckets)
            if group.todo > 0:
                # idle: up to prefill_chunk positions of every row (nobody waits; the memory
                # bound is the model's max_queries), else prefill_chunk tokens in all
                G = len(group.seqs)
                room = self.prefill_chunk * G if idle else self.prefill_chunk - spent
                spent += self._prefill_chunk(group, room)
            if group.todo == 0:
                self._prefilling.popleft()
                self._join(group)

    def _prefill_chunk(self, group: _Prefill, budget: int) -> int:
        """Run the next positions of ``group`` (``budget`` tokens over its rows, at least one
        position); returns the tokens computed, pads included."""
        G = len(group.seqs)
        n = min(group.todo, max(1, budget // G))
        cap = getattr(self.model, "max_queries", None)
        limit = (cap(group.offset, G) if cap is not None else None) or float("inf")
        n = min(n, limit)
        run = n
        if self.shape_buckets:
            if n < group.todo:  # more chunks follow: this one ends on a bucket
                n = run = _floor_bucket(n)
            elif query_bucket(n) <= limit:  # the last: padded up to one, the padding trimmed
                run = query_bucket(n)
        ids = group.window(n)
        ids = mx.array([r + [0] * (run - n) for r in ids], dtype=mx.int32)  # [G, run]
        self.model(ids, cache=group.caches)
        if run > n:
            for c in group.caches:
                c.trim(run - n)
        # evaluate per chunk: bounds the activations to one chunk and frees them before the
        # next step's decode call
        mx.eval([c.state for c in group.caches])
        self.stats.prefill_tokens += group.real_tokens(n)
        return G * run

    def _release(self, group: _Prefill) -> None:
        """The group's followers go back to the front of the queue, in their order."""
        with self._lock:
            self._waiting.extendleft(reversed(group.followers))
        group.followers = []

    def _join(self, group: _Prefill) -> None:
        for b, seq in enumerate(group.seqs):
            prompt = seq.req.prompt
            if len(prompt) - 1 > seq.cached:
                self.store.insert(prompt[:-1], [c.row_state(b) for c in group.caches])
        self._fit_store()
        self._release(group)
        for seq in group.seqs:
            seq.known = [seq.req.prompt[-1]]
        first = mx.array([s.req.prompt[-1] for s in group.seqs], dtype=mx.int32)
        if self._caches is None:
            self._caches, self._inputs = group.caches, first
        else:
            for mine, theirs in zip(self._caches, group.caches, strict=True):
                mine.extend(theirs)
            self._inputs = mx.concatenate([self._inputs, first])
        self.rows.extend(group.seqs)

    def _retire(self, seqs: list[_Seq], store: bool) -> None:
        """Take ``seqs`` out of the running batch; their cache state goes to the prefix store
        when ``store``."""
        if not seqs:
            return
        gone = {s.id for s in seqs}
        for i, s in enumerate(self.rows):
            if s.id in gone and store:
                n = len(s.req.prompt) + s.fed
                ids = s.req.prompt + s.generated[: s.fed]
                self.store.insert(ids, [c.row_state(i, n) for c in self._caches])
        if store:
            self._fit_store()
        keep = [i for i, s in enumerate(self.rows) if s.id not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._caches, self._inputs = None, None
            return
        for c in self._caches:
            c.filter(keep)
        self._inputs = self._inputs[mx.array(keep, dtype=mx.int32)]

    def _fit_store(self) -> None:
        """The prefix store keeps only what the running requests leave of the budget."""
        self.store.evict(limit=max(0, self.budget - self.reserved()))

    def _decode(self):
        """One model call over the running batch; returns the lazy tokens (and logprobs)."""
        if not self.rows:
            return None
        rows = list(self.rows)
        logits = self.model(self._inputs[:, None], cache=self._caches)[:, -1, :]  # [B, V]
        tokens = self._sample(rows, logits)
        lp = None
        want = [s.req.logprobs for s in rows if s.req.logprobs is not None]
        if want:
            logprobs = logits.astype(mx.float32)
            logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
            chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
            k = max(want)
            top = mx.argsort(-logprobs, axis=-1)[:, :k] if k else None
            top_lp = mx.take_along_axis(logprobs, top, axis=-1) if k else None
            lp = (chosen, top, top_lp)
        for s in rows:
            s.calls += 1
            s.unread += 1
        self._inputs = tokens
        self.stats.decode_steps += 1
        mx.async_eval(tokens, *(a for a in (lp or ()) if a is not None))
        return tokens, lp, rows

    def _speculate(self, events: list[Event]) -> None:
        """One speculative step over the running batch (lossless; see ``speculative/``).

        Every row runs the same window of ``W = num_draft + 1`` positions: first its known
        tokens (emitted, not in the cache yet: at least its last one), then drafts of the
        draft model, drawn one column at a time for all rows at once. The model verifies every
        window in one call. Row ``b`` keeps ``c_b`` positions (its known tokens and the drafts
        it accepts); all rows are trimmed to the smallest ``c``, so the batch stays aligned,
        and what a row accepted beyond it becomes its known tokens for the next window (the
        model recomputes them there). Rows with logits processors (their state follows each
        token) accept no drafts: they are decoded plainly inside the window.
        """
        if not self.rows:
            return
        from mlxllm.speculative import accept

        rows, W = list(self.rows), self.window
        draft = self.model.split(self._caches)[1]
        j = [len(s.known) for s in rows]
        known = mx.array([s.known + [0] * (W - len(s.known)) for s in rows], dtype=mx.int32)
        own = mx.array(j)
        dists = [None if s.greedy else s.dist for s in rows]
        col, cols, qs = known[:, 0], [known[:, 0]], []
        for i in range(W if self.model.feeds_last else W - 1):
            logits = self.model.propose(col[:, None], draft, i)[:, -1]  # [B, V]
            if i == W - 1:
                break  # the last column is in the draft's cache; its draft is not needed
            picks, q = [], []
            for b, s in enumerate(rows):
                if dists[b] is None:
                    picks.append(mx.argmax(logits[b]))
                    continue
                s.key, key = mx.random.split(s.key)
                qb = dists[b](logits[b : b + 1])[0]
                picks.append(mx.random.categorical(mx.log(qb), key=key))
                q.append(qb)
            col = mx.where(i + 1 < own, known[:, min(i + 1, W - 1)], mx.stack(picks))
            col = col.astype(mx.int32)
            cols.append(col)
            qs.append(q)
        window = mx.stack(cols, axis=1)  # [B, W]
        logits = self.model.verify(window, self._caches)  # [B, W, V]
        best = mx.argmax(logits, axis=-1)
        mx.eval(window, best, *(x for q in qs for x in q))
        ids, best_ids = window.tolist(), best.tolist()
        sampled = [b for b, d in enumerate(dists) if d is not None]
        kept, new = [], []
        for b, s in enumerate(rows):
            drafts = ids[b][j[b] :]
            if s.processors:
                row = logits[b, j[b] - 1 : j[b]]
                for p in s.processors:
                    row = p(s.req.prompt + s.generated, row)
                s.key, key = mx.random.split(s.key)
                a, t = 0, s.sampler(row, key=key).item()
            elif dists[b] is None:
                g = best_ids[b][j[b] - 1 :]
                a = 0
                while a < len(drafts) and drafts[a] == g[a]:
                    a += 1
                t = g[a]
            else:
                s.key, key = mx.random.split(s.key)
                p = s.dist(logits[b, j[b] - 1 :])
                if drafts:
                    k = sampled.index(b)
                    q = mx.stack([qs[i][k] for i in range(j[b] - 1, W - 1)])
                    a, t = accept(drafts, p, q, key)
                else:  # a row catching up: its next token is drawn as usual
                    a, t = 0, mx.random.categorical(mx.log(p[0]), key=key).item()
            kept.append(j[b] + a)
            new.append(drafts[:a] + [t])
        c = min(kept)
        for cache in self._caches:
            cache.trim(W - c)
        self.stats.decode_steps += 1
        ended = []
        for b, s in enumerate(rows):
            s.known = ids[b][c : kept[b]] + [new[b][-1]]
            s.calls += c  # positions of this row now in the cache (``fed``)
            if s.finished:
                continue
            lp = self._window_logprobs(s, logits[b], j[b], new[b])
            for i, token in enumerate(new[b]):
                ev = self._take(s, token)
                reason = ev.finish_reason
                if lp is not None:
                    ev.logprob, ev.top_logprobs = lp[i]
                events.append(ev)
                if reason is not None:
                    s.finished = True
                    ended.append(s)
                    break
        self._retire(ended, store=True)

    def _window_logprobs(self, s: _Seq, logits: mx.array, start: int, tokens: list[int]):
        """(logprob, top alternatives) of each emitted token of a window row."""
        if s.req.logprobs is None:
            return None
        rows = logits[start - 1 : start - 1 + len(tokens)].astype(mx.float32)
        rows = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
        n = s.req.logprobs
        chosen = mx.take_along_axis(rows, mx.array(tokens)[:, None], axis=-1)[:, 0].tolist()
        top = mx.argsort(-rows, axis=-1)[:, :n] if n else None
        out = []
        for i in range(len(tokens)):
            alts = []
            if n:
                alts = list(zip(top[i].tolist(), mx.take(rows[i], top[i]).tolist(), strict=True))
            out.append((chosen[i], alts))
        return out

    def _sample(self, rows: list[_Seq], logits: mx.array) -> mx.array:
        if all(s.greedy and not s.processors for s in rows):
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        picks = []
        for i, s in enumerate(rows):
            row = logits[i : i + 1]
            for p in s.processors:
                row = p(s.req.prompt + s.generated, row)
            s.key, key = mx.random.split(s.key)
            picks.append(s.sampler(row, key=key).astype(mx.int32))
        return mx.concatenate(picks)

    def _emit(self, events: list[Event]) -> None:
        """Hand out the tokens of the last decode call; rows that end leave the batch."""
        if self._unread is None:
            return
        tokens, lp, rows = self._unread
        self._unread = None
        ids = tokens.tolist()
        if lp is not None:
            chosen = lp[0].tolist()
            top = lp[1].tolist() if lp[1] is not None else None
            top_lp = lp[2].tolist() if lp[2] is not None else None
        ended = []
        for i, s in enumerate(rows):
            if s.finished:
                continue  # cancelled or ended after this call was queued
            s.unread -= 1
            ev = self._take(s, ids[i])
            reason = ev.finish_reason
            if lp is not None and s.req.logprobs is not None:
                ev.logprob = chosen[i]
                n = s.req.logprobs
                ev.top_logprobs = list(zip(top[i][:n], top_lp[i][:n], strict=True)) if n else []
            events.append(ev)
            if reason is not None:
                s.finished = True
                ended.append(s)
        self._retire([s for s in ended if s in self.rows], store=True)

    def _take(self, s: _Seq, token: int) -> Event:
        """``token`` joins the row's output; its event says whether it ends the request."""
        s.generated.append(token)
        self.stats.generated_tokens += 1
        reason = None
        if token in s.stop_ids:
            reason = "stop"
        elif len(s.generated) >= s.req.max_tokens:
            reason = "length"
        return self._event(s, token, reason)

    def _event(self, s: _Seq, token, reason, error=None) -> Event:
        return Event(
            request_id=s.id,
            token=token,
            finish_reason=reason,
            prompt_tokens=len(s.req.prompt),
            cached_tokens=s.cached,
            generation_tokens=len(s.generated),
            error=error,
        )

    # ---- running in the background ---------------------------------------------------------

    def start(self) -> None:
        """Run ``step()`` in a background thread whenever there is work (from then on only
        that thread steps the engine)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlxllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    idle = not self.busy
                    while not self._stop and not self.busy:
                        self._wake.wait()
                    if self._stop:
                        return
                    if idle:
                        self._gather()
                try:
                    self.step()
                except Exception as e:  # a failed step ends its requests, never the process
                    self._fail_all(f"{type(e).__name__}: {e}")
        finally:
            # this thread's streams go with it (left over, they abort the process at exit)
            mx.synchronize()
            mx.clear_streams()

    def _gather(self) -> None:
        """Wait (holding the lock, which ``wait`` releases) while a burst keeps arriving: up to
        ``gather`` seconds, ending at the first tick in which no request came and none is on
        its way (see the class doc)."""
        deadline = time.monotonic() + self.gather
        n = len(self._waiting)
        while not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(min(GATHER_TICK, left))
            coming = self.arrivals() if self.arrivals is not None else 0
            if len(self._waiting) == n and not coming:
                return
            n = len(self._waiting)

    def _fail_all(self, message: str) -> None:
        seqs = self.rows + self._prefill_seqs() + [s for g in self._prefilling for s in g.followers]
        self.rows, self._caches, self._inputs, self._unread = [], None, None, None
        self._prefilling.clear()
        for s in seqs:
            s.finished = True
            ev = self._event(s, None, "error", error=message)
            h = self._handles.pop(s.id, None)
            if h is not None:
                h._push(ev)

    def generate(self, requests: list[Request], max_steps: int | None = None) -> dict:
        """Run ``requests`` to the end in this thread; returns ``{id: [Event, ...]}``."""
        ids = [self.submit(r) for r in requests]
        out = {i: [] for i in ids}
        steps = 0
        while self.busy and (max_steps is None or steps < max_steps):
            for ev in self.step():
                if ev.request_id in out:
                    out[ev.request_id].append(ev)
            steps += 1
        return out


def tokens_of(events: list[Event]) -> list[int]:
    """The generated ids in ``events`` (the stop id included)."""
    return [e.token for e in events if e.token is not None]
