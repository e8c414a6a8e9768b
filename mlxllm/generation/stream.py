"""Text streaming on top of step.py: chat/plain prompts in, UTF-8-safe text chunks out.

``stream_generate`` yields a ``Chunk`` per step with the new text and running stats; it stops
on the tokenizer's eos ids, on stop strings (which are never emitted), or at ``max_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx

from mlxllm.cache import PromptCache
from mlxllm.errors import InvalidArgument
from mlxllm.generation.sample import check_sampling, make_sampler
from mlxllm.generation.sample import repetition_penalty as make_rep_penalty
from mlxllm.generation.step import Progress, StepStats, generate_step
from mlxllm.models.base import context_length


@dataclass
class Chunk:
    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", or None
    acceptance: list[float] | None = None  # speculative: drafts kept / proposed, by position


def encode_prompt(tokenizer, prompt, system: str | None, chat_template: bool | None) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    if isinstance(prompt, list):  # messages
        messages = list(prompt)
    else:
        use_template = chat_template if chat_template is not None else False
        if not use_template:
            return tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}]
    if system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # the template already carries BOS where the model wants it
    return tokenizer.encode(text, add_special_tokens=False)


def split_at_stop(text: str, stops: list[str], final: bool = False) -> tuple[str, str, bool]:
    """Split ``text`` into (safe to emit, held back, stop matched).

    On a match the safe part ends right before the stop string. Otherwise the held-back tail is
    the longest suffix that could still grow into a stop string (nothing when ``final``).
    """
    if not stops:
        return text, "", False
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    keep = 0 if final else stop_hold(text, stops)
    return text[: len(text) - keep], text[len(text) - keep :], False


def stop_hold(text: str, stops) -> int:
    """Length of the tail of ``text`` that could still grow into one of ``stops`` (the
    longest suffix that is a proper prefix of one): text to hold back while streaming."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    system: str | None = None,
    chat_template: bool | None = None,
    cache: PromptCache | None = None,
    prefill_chunk: int = 512,
    progress: Progress | None = None,
    allow_long_prompt: bool = False,
    drafter=None,
    num_draft: int = 3,
) -> Iterator[Chunk]:
    """Generate text, yielding chunks as they become final.

    Args:
        prompt: text, a list of chat messages (``{"role", "content"}``) or token ids.
        max_tokens: upper bound on new tokens.
        temperature, top_p, top_k, min_p: sampling (``temperature=0`` is greedy).
        repetition_penalty: >1 discourages recent tokens.
        seed: seed for sampling.
        stop: strings that end generation (not included in the output).
        system: system prompt, used when the prompt goes through the chat template.
        chat_template: for a text prompt, wrap it as a user message in the chat template
            (default False for text; messages always use it).
        cache: a ``PromptCache`` to reuse across calls (multi-turn chat); its common prefix
            with the prompt is not recomputed.
        prefill_chunk: prompt tokens per prefill step (at most; see ``step.prefill``).
        progress: ``progress(done, total, seconds)`` during prompt processing.
        allow_long_prompt: run a prompt longer than the model's context (refused otherwise:
            past it, models without RoPE scaling for that length produce noise).
        drafter: speculative decoding (``mlxllm.speculative``: a ``DraftModel`` or an
            ``MTPDrafter``), ``num_draft`` tokens per round; the same tokens (greedy) or the
            same distribution (sampling) as without. Keep the same drafter with the same
            ``cache`` across turns.

    Yields:
        ``Chunk`` objects; the last one has ``finish_reason`` set.
    """
    check_sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens)
    if seed is not None:
        mx.random.seed(seed)
    ids = encode_prompt(tokenizer, prompt, system, chat_template)
    if not ids:
        raise InvalidArgument("the prompt is empty; pass some text")
    limit = context_length(model.config)
    if limit and len(ids) > limit and not allow_long_prompt:
        raise InvalidArgument(
            f"the prompt is {len(ids)} tokens, longer than the model's context of {limit}; "
            "shorten it (or pass --allow-long-prompt to run past the context anyway)"
        )
    cache = cache if cache is not None else PromptCache(model)
    todo = cache.prepare(ids, keep=drafter.offset if drafter is not None else None)
    if drafter is not None:
        drafter.trim_to(cache.offset)
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = [make_rep_penalty(repetition_penalty)] if repetition_penalty else []
    stats = StepStats()
    detok = tokenizer.detokenizer()
    stops = [s for s in (stop or []) if s]
    eos = tokenizer.eos_token_ids
    mx.reset_peak_memory()
    pending = ""  # text held back while it could be the start of a stop string
    generated: list[int] = []

    def chunk(text, token, reason=None):
        gen_time = time.perf_counter() - stats.start
        n = stats.generation_tokens
        return Chunk(
            text=text,
            token=token,
            prompt_tokens=len(todo),
            prompt_tps=len(todo) / stats.prompt_time if stats.prompt_time else 0.0,
            generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
            acceptance=getattr(stats, "acceptance", None),
        )

    reason = "length"
    if drafter is None:
        steps = generate_step(
            model,
            todo,
            cache.layers,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prefill_chunk=prefill_chunk,
            stats=stats,
            progress=progress,
        )
    else:
        from mlxllm.speculative import SpecStats, speculative_generate_step

        stats = SpecStats()
        steps = speculative_generate_step(
            model, drafter, todo, cache.layers, num_draft=num_draft, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            logits_processors=processors, prefill_chunk=prefill_chunk, stats=stats,
            progress=progress,
        )  # fmt: skip
    try:
        cut = False  # a stop string matched: whatever follows it is dropped
        for token in steps:
            generated.append(token)
            if token in eos:
                reason = "stop"
                break
            pending += detok.add(token)
            out, held, cut = split_at_stop(pending, stops)
            if cut:
                pending, reason = out, "stop"
                break
            pending = held
            if out:
                yield chunk(out, token)
        if not cut:
            out, _, cut = split_at_stop(pending + detok.finalize(), stops, final=True)
            pending = out
            if cut:
                reason = "stop"
        yield chunk(pending, None, reason)
    finally:
        steps.close()
        # the cache holds a prefix of prompt + generated ids (one lookahead token may be in it)
        cache.sync(ids + generated)


def generate(
    model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs
) -> str:
    """Generate and return the whole text; same arguments as ``stream_generate``."""
    parts, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        parts.append(last.text)
    if verbose and last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory {last.peak_memory_gb:.2f} GB"
        )
    return "".join(parts)
