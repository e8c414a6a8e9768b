"""Token-id generation: chunked prefill, then one token per step.

The next step is queued on the device (``mx.async_eval``) before the current token is handed
out, so Python work per token (detokenizing, printing) overlaps the model's compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from mlxllm.generation.sample import Sampler, greedy


@dataclass
class StepStats:
    prompt_tokens: int = 0
    prompt_time: float = 0.0  # seconds from start until the first token is known
    generation_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


# Prompt tokens run in chunks whose size adapts so that each takes about this long: Ctrl-C is
# seen between chunks (MLX computes without returning to Python), and progress moves.
PREFILL_SECONDS = 0.5
MIN_PREFILL_CHUNK = 32

Progress = Callable[[int, int, float], None]  # (tokens done, tokens in all, seconds so far)


def prefill(
    model,
    ids: list[int],
    cache,
    chunk: int = 512,
    progress: Progress | None = None,
    on_hidden: Callable | None = None,
) -> None:
    """Run ``ids`` through the model into ``cache`` in chunks of at most ``chunk`` tokens.

    Chunking bounds the activation memory of long prompts (scores are chunk x context). Where
    the model's attention has a score budget (MLA: ``model.max_queries``), chunks shrink as the
    context grows so that one chunk's scores stay within it: the layers do not evaluate inside a
    call, so this loop is what bounds the peak. Within those bounds the chunk size follows the
    measured speed so that each chunk takes about ``PREFILL_SECONDS`` (at least
    ``MIN_PREFILL_CHUNK``, at most doubling per step): an interrupt is answered and
    ``progress(done, total, seconds)`` is called about that often, on a slow CPU as on a GPU
    (where it stays at ``chunk``). ``on_hidden(start, end, hidden)``, when given, gets the
    model's final hidden states of each chunk (a speculative drafter's prefill) and returns
    arrays to evaluate with the cache.
    """
    limit = getattr(model, "max_queries", None)
    done, size, t0 = 0, min(chunk, 4 * MIN_PREFILL_CHUNK), time.perf_counter()
    while done < len(ids):
        t = time.perf_counter()
        n = size
        if limit is not None:
            n = min(n, limit(cache[0].offset) or n)
        piece = ids[done : done + n]
        extra = []
        if on_hidden is None:
            model(mx.array(piece)[None], cache=cache)
        else:
            h = model.model(mx.array(piece)[None], cache=cache)
            extra = on_hidden(done, done + len(piece), h)
        # evaluate the cache now so the graph of the next chunk stays small and the scores of
        # this chunk are freed before the next is built
        mx.eval([c.state for c in cache], extra)
        done += len(piece)
        now = time.perf_counter()
        if progress is not None:
            progress(done, len(ids), now - t0)
        fit = int(len(piece) * PREFILL_SECONDS / max(now - t, 1e-6))
        size = max(MIN_PREFILL_CHUNK, min(chunk, 2 * size, fit))


def generate_step(
    model,
    prompt_ids: list[int],
    cache,
    *,
    max_tokens: int = 256,
    sampler: Sampler = greedy,
    logits_processors: list[Callable] | None = None,
    prefill_chunk: int = 512,
    stats: StepStats | None = None,
    progress: Progress | None = None,
) -> Iterator[int]:
    """Yield generated token ids (at most ``max_tokens``).

    ``cache`` must already hold whatever precedes ``prompt_ids``; ``prompt_ids`` must be non-empty
    (its last id is the one the first new token is sampled after). ``progress`` is called
    during prefill (see ``prefill``).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    stats = stats or StepStats()
    stats.prompt_tokens = len(prompt_ids)
    history = list(prompt_ids)
    processors = logits_processors or []

    def step(y: mx.array) -> mx.array:
        logits = model(y[None], cache=cache)[:, -1, :]  # [1, vocab]
        for p in processors:
            logits = p(history, logits)
        return sampler(logits)

    prefill(model, prompt_ids[:-1], cache, prefill_chunk, progress)
    y = step(mx.array(prompt_ids[-1:]))
    mx.async_eval(y)
    for n in range(1, max_tokens + 1):
        more = n < max_tokens
        if processors:
            # processors read the token history, so the value is needed before the next step
            token = y.item()
            history.append(token)
            y_next = step(y) if more else None
        else:
            # queue the next step on the still-lazy token, then wait for this one
            y_next = step(y) if more else None
            if more:
                mx.async_eval(y_next)
            token = y.item()
        if n == 1:
            stats.prompt_time = time.perf_counter() - stats.start
            stats.start = time.perf_counter()
        stats.generation_tokens = n
        yield token
        y = y_next
