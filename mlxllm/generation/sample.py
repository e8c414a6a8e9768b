"""Pure sampling functions: ``logits[B, V] -> token ids[B]``, and logits processors.

Nothing here knows about models, caches or text.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from mlxllm.errors import InvalidArgument

# sampler(logits[B, V], key=None) -> ids[B]; ``key``: an ``mx.random.key`` (a request's own
# random stream; None draws from the global one, ``mx.random.seed``)
Sampler = Callable[..., mx.array]


def greedy(logits: mx.array, key: mx.array | None = None) -> mx.array:
    return mx.argmax(logits, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the ``k`` largest logits, set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -k][..., None]  # k-th largest value
    return mx.where(logits < kth, -mx.inf, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the smallest set of tokens whose probability reaches ``p``."""
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # a token stays if the mass before it is still below p (the top token always stays)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    sorted_logits = mx.where(mass_before < p, sorted_logits, -mx.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(sorted_logits, inverse, axis=-1)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    cutoff = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p, logits.dtype))
    return mx.where(logprobs < cutoff, -mx.inf, logits)


def check_sampling(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
) -> None:
    """Refuse sampling settings outside their range (``InvalidArgument`` naming the flag and
    what it takes), so that nonsense never turns into garbage text."""

    def need(ok: bool, msg: str):
        if not ok:
            raise InvalidArgument(msg)

    need(math.isfinite(temperature) and temperature >= 0,
         f"--temperature {temperature}: use 0 (greedy) or a positive number")  # fmt: skip
    need(0.0 < top_p <= 1.0, f"--top-p {top_p}: use a probability mass in (0, 1] (1 = off)")
    need(top_k >= 0, f"--top-k {top_k}: use 0 (off) or a positive number of tokens")
    need(0.0 <= min_p <= 1.0, f"--min-p {min_p}: use a fraction in [0, 1] (0 = off)")
    if repetition_penalty is not None:
        need(math.isfinite(repetition_penalty) and repetition_penalty > 0,
             f"--repetition-penalty {repetition_penalty}: use a number > 0 (1 = off, > 1 "
             "discourages repeats)")  # fmt: skip
    if seed is not None:
        need(0 <= seed < 2**64, f"--seed {seed}: use a number from 0 to 2**64 - 1")
    if max_tokens is not None:
        need(max_tokens >= 1, f"--max-tokens {max_tokens}: use 1 or more")


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """Build a sampler. ``temperature == 0`` is greedy (the other settings then do nothing)."""
    check_sampling(temperature, top_p, top_k, min_p)
    if temperature == 0:
        return greedy

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        logits = filtered_logits(logits, temperature, top_p, top_k, min_p)
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


def filtered_logits(
    logits: mx.array, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> mx.array:
    """The logits a sampler draws from (float32, tempered, filtered): its distribution is
    ``softmax`` of these. ``temperature`` must be > 0."""
    logits = logits.astype(mx.float32) / temperature
    logits = apply_top_k(logits, top_k)
    logits = apply_min_p(logits, min_p)
    return apply_top_p(logits, top_p)


def distribution(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """``probs(logits[..., V]) -> [..., V]``: the distribution ``make_sampler`` with the same
    settings draws from (greedy: all mass on the argmax)."""
    check_sampling(temperature, top_p, top_k, min_p)
    if temperature == 0:

        def one_hot(logits: mx.array) -> mx.array:
            top = mx.argmax(logits, axis=-1, keepdims=True)
            return (mx.arange(logits.shape[-1]) == top).astype(mx.float32)

        return one_hot
    return lambda logits: mx.softmax(filtered_logits(logits, temperature, top_p, top_k, min_p),
                                     axis=-1)  # fmt: skip


def repetition_penalty(penalty: float, context_size: int = 64):
    """CTRL-style penalty (Keskar et al. 2019) on tokens seen in the last ``context_size`` ids.

    Returns ``process(history_ids: list[int], logits[B, V]) -> logits``. Positive logits are
    divided by ``penalty``, negative ones multiplied, as in transformers.
    """
    check_sampling(repetition_penalty=penalty)

    def process(history: list[int], logits: mx.array) -> mx.array:
        if not history or penalty == 1.0:
            return logits
        ids = mx.array(sorted(set(history[-context_size:])))
        picked = logits[..., ids]
        picked = mx.where(picked > 0, picked / penalty, picked * penalty)
        logits[..., ids] = picked
        return logits

    return process
