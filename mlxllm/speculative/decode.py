"""Speculative decoding of one sequence: a drafter proposes ``k`` tokens, the model verifies
them in one call, the accepted ones (and one more of the model's own) are emitted.

Lossless by construction. Greedy: a draft is kept while it equals the model's argmax, and the
token after the last kept one is the model's argmax there, so the output is plain greedy
decoding's. Sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``d`` drawn from the
drafter's distribution ``q`` is kept with probability ``min(1, p(d) / q(d))`` (``p``: the
model's distribution with the same temperature / top-p / top-k / min-p); at the first rejection
the token is drawn from ``max(p - q, 0)`` renormalized, and when all ``k`` are kept one more is
drawn from ``p`` at the next position, so every emitted token is distributed as plain sampling's.

A round: the model runs ``[y, d1..dk]`` (``y``: the last emitted token, not yet in the cache)
and returns ``k + 1`` next-token rows and hidden states; its cache is trimmed back to the kept
positions; the drafter is told which tokens were kept (with the model's hidden states at those
positions, which an MTP drafter reads). One host sync per round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import mlx.core as mx

from mlxllm.generation.sample import distribution
from mlxllm.generation.step import Progress, StepStats, prefill


@dataclasses.dataclass
class SpecStats(StepStats):
    """``StepStats`` plus acceptance: ``drafted[i]`` / ``accepted[i]`` count the rounds that
    proposed / kept a draft at position ``i`` (0 = the first draft)."""

    rounds: int = 0
    drafted: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)

    def record(self, k: int, a: int) -> None:
        self.rounds += 1
        for lst in (self.drafted, self.accepted):
            lst.extend([0] * (k - len(lst)))
        for i in range(k):
            self.drafted[i] += 1
            self.accepted[i] += i < a

    @property
    def acceptance(self) -> list[float]:
        """Per draft position: kept / proposed."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted, strict=True)]


def accept(
    drafts: list[int],
    p: mx.array,
    q: mx.array | None,
    key: mx.array | None = None,
) -> tuple[int, int]:
    """How many of ``drafts`` (k ids) to keep and the token after them.

    ``p``: the model's distribution at the k + 1 positions ``[k + 1, V]``; ``q``: the drafter's
    at the k draft positions ``[k, V]``, None for greedy (``p`` one-hot: a draft is kept while it
    is the argmax)."""
    k = len(drafts)
    if q is None:
        best = mx.argmax(p, axis=-1).tolist()
        a = 0
        while a < k and drafts[a] == best[a]:
            a += 1
        return a, best[a]
    k_u, k_t = mx.random.split(key) if key is not None else (None, None)
    d = mx.array(drafts, dtype=mx.int32)[:, None]
    pd = mx.take_along_axis(p[:k], d, axis=-1)[:, 0]
    qd = mx.take_along_axis(q, d, axis=-1)[:, 0]
    u = mx.random.uniform(shape=(k,), key=k_u)
    kept = (u * qd < pd).tolist()  # u < p/q, without dividing by a zero q
    a = 0
    while a < k and kept[a]:
        a += 1
    if a < k:
        residual = mx.maximum(p[a] - q[a], 0.0)
        # p == q exactly leaves no residual mass (then the draft is always kept: unreachable)
        target = mx.where(residual.sum() > 0, residual, p[a])
    else:
        target = p[k]
    t = mx.random.categorical(mx.log(target), key=k_t)
    return a, t.item()


def speculative_generate_step(
    model,
    drafter,
    prompt_ids: list[int],
    cache,
    *,
    num_draft: int = 3,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    logits_processors: list[Callable] | None = None,
    key: mx.array | None = None,
    prefill_chunk: int = 512,
    stats: SpecStats | None = None,
    progress: Progress | None = None,
) -> Iterator[int]:
    """Yield generated ids (at most ``max_tokens``), as ``generate_step`` does with the same
    sampling settings, ``num_draft`` drafts per round from ``drafter`` (``DraftModel`` or
    ``MTPDrafter``). ``cache`` and the drafter must hold the same positions (whatever precedes
    ``prompt_ids``; ``drafter.trim_to(offset)``)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if num_draft < 1:
        raise ValueError("num_draft must be >= 1")
    stats = stats if stats is not None else SpecStats()
    stats.prompt_tokens = len(prompt_ids)
    probs = distribution(temperature, top_p, top_k, min_p)
    greedy = temperature == 0
    processors = logits_processors or []
    history = list(prompt_ids)

    def keys():
        nonlocal key
        if key is None:
            return None
        key, sub = mx.random.split(key)
        return sub

    def rows(logits: mx.array, drafts: list[int]) -> mx.array:
        """The model's distributions at each position, processors applied with the history
        each position would have."""
        if not processors:
            return probs(logits)
        out = []
        for i in range(logits.shape[0]):
            row = logits[i : i + 1]
            for proc in processors:
                row = proc(history + drafts[:i], row)
            out.append(probs(row)[0])
        return mx.stack(out)

    drafter.begin(prompt_ids)

    # the model's hidden states of each prompt chunk go to the drafter (an MTP drafter's
    # cache needs them)
    def to_drafter(start: int, end: int, hidden: mx.array):
        drafter.prefill(prompt_ids, start, end, hidden)
        return drafter.state()

    prefill(model, prompt_ids[:-1], cache, prefill_chunk, progress, on_hidden=to_drafter)
    y, produced = prompt_ids[-1], 0
    h = model.model(mx.array([[y]]), cache=cache)
    p = rows(model.head(h)[0], [])[0]
    t = (mx.argmax(p) if greedy else mx.random.categorical(mx.log(p), key=keys())).item()
    drafter.commit(0, 0, h, [t])
    stats.prompt_time = time.perf_counter() - stats.start
    stats.start = time.perf_counter()
    pending = [t]
    while True:
        for tok in pending:
            produced += 1
            stats.generation_tokens = produced
            history.append(tok)
            yield tok
            if produced >= max_tokens:
                return
        y = pending[-1]
        k = min(num_draft, max_tokens - produced)
        drafts, q = drafter.draft(k, None if greedy else probs, keys())
        ids = mx.concatenate([mx.array([y], dtype=mx.int32), drafts])[None]
        h = model.model(ids, cache=cache)  # [1, k + 1, D]
        logits = model.head(h)[0]
        if greedy and not processors:  # one sync: the drafts and the model's argmax
            best = mx.argmax(logits, axis=-1)
            mx.eval(drafts, best)
            drafts, best = drafts.tolist(), best.tolist()
            a = 0
            while a < k and drafts[a] == best[a]:
                a += 1
            t = best[a]
        else:
            mx.eval(drafts, logits, *(() if q is None else (q,)))
            drafts = drafts.tolist()
            a, t = accept(drafts, rows(logits, drafts), q, keys())
        for c in cache:
            c.trim(k - a)
        drafter.commit(k, a, h[:, : a + 1], [*drafts[:a], t])
        stats.record(k, a)
        pending = [*drafts[:a], t]
