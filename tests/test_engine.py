"""The serving engine (mlxllm/engine): continuous batching, prefix reuse, admission, handles.

The oracle for every batched output is the same prompt generated alone by ``generate_step``
(one sequence, its own cache: the path the transformers parity tests cover), per family at tiny
size and on the real fixtures.
"""

from __future__ import annotations

import asyncio
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from test_deepseek import make_tiny_deepseek
from test_moe_qwen import _make_tiny as make_tiny_moe

from helpers import QWEN, SMOL, fixture_model, make_tiny_hf, quantized_copy
from mlxllm import load
from mlxllm.cache import KVCache
from mlxllm.cache.batch import BatchKVCache, batch_caches
from mlxllm.engine import Engine, PrefixStore, QueueFull, Request, tokens_of
from mlxllm.errors import InvalidArgument
from mlxllm.generation.sample import make_sampler, repetition_penalty
from mlxllm.generation.step import generate_step
from mlxllm.loader import load_model

FAMILIES = ["dense", "qwen2_moe", "deepseek-v2-lite", "deepseek-v3"]
BUDGET = 1 << 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        if name == "dense":
            make_tiny_hf("qwen2-untied", folder, seed=3, tokenizer=False)
        elif name == "qwen2_moe":
            make_tiny_moe("qwen2_moe", folder, seed=1)
        elif name == "deepseek-v2-lite":
            make_tiny_deepseek("v2-lite", folder, seed=2)
        else:
            make_tiny_deepseek("v3-yarn", folder, seed=3)
        out[name] = load_model(folder, dtype=mx.float32)
    return out


def _prompt(seed: int, n: int, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _alone(model, prompt, n, **sampling) -> list[int]:
    procs = []
    if sampling.get("repetition_penalty"):
        procs = [repetition_penalty(sampling["repetition_penalty"])]
    return list(generate_step(model, prompt, model.make_cache(), max_tokens=n,
                              logits_processors=procs))  # fmt: skip


def _run(engine, requests, joins=(), until=None):
    """Step ``engine`` to the end; ``joins``: ``(step, request)`` submitted at that step.
    Returns the events of every request, in submission order."""
    ids = [engine.submit(r) for r in requests]
    events = {i: [] for i in ids}
    joins = sorted(joins, key=lambda j: j[0])
    step = 0
    while engine.busy or joins:
        while joins and joins[0][0] <= step:
            rid = engine.submit(joins.pop(0)[1])
            ids.append(rid)
            events[rid] = []
        for ev in engine.step():
            events[ev.request_id].append(ev)
        step += 1
        if until is not None:
            until(engine, step)
    return [events[i] for i in ids]


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "in-step"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_alone(models, family, pipeline):
    """Concurrent prompts of different lengths, some leaving early, one joining mid-stream
    while another prefills in chunks, several prefilled together (left-padded, in chunks of
    positions while others decode): every request's tokens equal its prompt run alone, with
    decode calls pipelined (a GPU's default) or read in their step (the CPU's)."""
    model = models[family]
    specs = [(5, 24), (17, 6), (30, 24), (25, 3), (1, 12), (9, 10)]
    prompts = [_prompt(i, n) for i, (n, _) in enumerate(specs)]
    late = [_prompt(99, 33), _prompt(98, 30)]
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=8, prefix_cache_bytes=0,
                    pipeline=pipeline)  # fmt: skip
    groups, chunk = [], engine._prefill_chunk

    def spy(group, budget):
        n = chunk(group, budget)
        groups.append((len(group.seqs), n // len(group.seqs)))
        return n

    engine._prefill_chunk = spy
    sizes = []
    got = _run(
        engine,
        [Request(p, max_tokens=m) for p, (_, m) in zip(prompts, specs, strict=True)],
        joins=[(9, Request(late[0], max_tokens=16)), (9, Request(late[1], max_tokens=5))],
        until=lambda e, s: sizes.append(len(e.rows)),
    )
    for p, (_, m), evs in zip(prompts + late, specs + [(0, 16), (0, 5)], got, strict=True):
        assert tokens_of(evs) == _alone(model, p, m)
        assert evs[-1].finish_reason == "length" and evs[-1].generation_tokens == m
    # the batch really ran several rows at once and changed size as requests came and went
    assert max(sizes) >= 4 and len(set(sizes)) >= 3
    assert (3, 8) in groups  # [17, 30, 25] together while idle: 8 positions of each row
    assert any(g == 2 and n <= 4 for g, n in groups)  # the late two: 8 tokens in all per step
    assert engine.stats.prefill_tokens == sum(len(p) - 1 for p in prompts + late)


def test_batch_cache_rows_leave_and_join():
    """The padding bookkeeping: rows keep their own positions through extend and filter."""
    rng = np.random.default_rng(0)
    singles = []
    for n in (3, 7, 1):
        c = KVCache()
        c.update_and_fetch(*(mx.array(rng.standard_normal((1, 2, n, 4)), mx.float32),) * 2)
        singles.append([c])
    (b,) = batch_caches([singles[0], singles[1]])
    assert b.left == [4, 0] and b.offset == 7 and b.position.tolist() == [3, 7]
    (other,) = batch_caches([singles[2]])
    b.extend(other)
    assert b.left == [4, 0, 6] and b.position.tolist() == [3, 7, 1]
    mask = np.array(b.make_mask(1))[:, 0, 0]
    assert mask.sum(axis=1).tolist() == [4, 8, 2]  # own positions + the new one
    b.filter([0, 2])  # the longest row leaves: the padding both share goes
    assert b.left == [0, 2] and b.offset == 3
    for row, single in ((0, singles[0]), (1, singles[2])):
        np.testing.assert_array_equal(np.array(b.row_state(row)[0]), np.array(single[0].state[0]))
    assert isinstance(b, BatchKVCache)


def test_bucketed_keys_are_the_exact_attention():
    """``bucket_keys``: a call of several queries gets the keys up to the end of the buffer (a
    multiple of the block) and a mask that hides the rest; attention is unchanged."""
    rng = np.random.default_rng(1)

    def rand(*shape):
        return mx.array(rng.standard_normal(shape), mx.float32)

    rows = []
    for n in (3, 9):
        c = KVCache()
        c.update_and_fetch(rand(1, 2, n, 4), rand(1, 2, n, 4))
        rows.append([c])
    exact, bucketed = batch_caches(rows), batch_caches(rows)
    bucketed[0].bucket_keys = True
    q, k, v = rand(2, 4, 5, 4), rand(2, 2, 5, 4), rand(2, 2, 5, 4)
    out = []
    for (cache,) in (exact, bucketed):
        mask = cache.make_mask(5)
        keys, values = cache.update_and_fetch(k, v)
        out.append(mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.5, mask=mask))
        assert mask.shape[-1] == keys.shape[2]
    assert exact[0].update_and_fetch(k[:, :, :1], v[:, :, :1])[0].shape[2] == 15
    assert bucketed[0].make_mask(5).shape[-1] == 256 and bucketed[0].offset == 14
    np.testing.assert_allclose(np.array(out[1]), np.array(out[0]), rtol=1e-5, atol=1e-6)
    # one query (decode) still sees exactly the written keys
    assert bucketed[0].update_and_fetch(k[:, :, :1], v[:, :, :1])[0].shape[2] == 15


class _Shapes:
    """The model with every call's input shape recorded."""

    def __init__(self, model):
        self.inner, self.calls = model, []

    def __call__(self, ids, cache=None):
        self.calls.append(ids.shape)
        return self.inner(ids, cache=cache)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_buckets_change_no_token(models, family):
    """``shape_buckets`` (CUDA's default) on the CPU: prefill chunks padded at the end to a
    bucket (the padding trimmed from the cache), keys up to the buffer's end; prompts of
    several lengths, batched, one joining, a second round from the prefix store, and the
    windows of a draft model and of an MTP layer: every output equals the request alone, and
    the prefill calls had bucket widths only."""
    model = models[family]
    spy = _Shapes(model)
    kw = dict(memory_budget=BUDGET, prefill_chunk=128, shape_buckets=True, allow_long_prompt=True)
    engine = Engine(spy, **kw)
    prompts = [_prompt(60 + i, n) for i, n in enumerate([5, 23, 150, 70, 190])]
    reqs = [Request(p, max_tokens=8) for p in prompts]
    late = Request(_prompt(70, 41), max_tokens=6)
    got = _run(engine, reqs, joins=[(2, late)])
    again = Request(prompts[2] + tokens_of(got[2])[:5] + _prompt(71, 9), max_tokens=6)
    got += _run(engine, [again])
    for r, evs in zip([*reqs, late, again], got, strict=True):
        assert tokens_of(evs) == _alone(model, r.prompt, r.max_tokens)
    assert got[-1][-1].cached_tokens > 150
    widths = {shape[1] for shape in spy.calls if shape[1] > 1}
    assert widths and all(w % 64 == 0 for w in widths), widths
    assert engine.stats.prefill_tokens == sum(len(r.prompt) - 1 for r in [*reqs, late]) + (
        len(again.prompt) - 1 - got[-1][-1].cached_tokens
    )
    for kind in ("draft", "mtp"):
        pair = Engine(model, num_draft=3, **_drafting(model, kind), **kw)
        for r, evs in zip(reqs, _run(pair, reqs), strict=True):
            assert tokens_of(evs) == _alone(model, r.prompt, r.max_tokens), kind


@pytest.mark.parametrize("family", ["dense", "deepseek-v2-lite"])
def test_seeded_sampling_equals_alone(models, family):
    """With a seed per request, sampled tokens do not depend on what runs beside them; greedy
    rows with a repetition penalty (read before the next call) match ``generate_step``."""
    model = models[family]
    prompts = [_prompt(10 + i, 6 + 9 * i) for i in range(4)]
    sampled = [Request(p, max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=i)
               for i, p in enumerate(prompts[:3])]  # fmt: skip
    penalized = Request(prompts[3], max_tokens=16, repetition_penalty=1.3)
    together = _run(Engine(model, memory_budget=BUDGET, prefill_chunk=8), sampled + [penalized])
    for req, evs in zip(sampled, together, strict=False):
        alone = _run(Engine(model, memory_budget=BUDGET), [req])[0]
        assert tokens_of(evs) == tokens_of(alone)
    assert tokens_of(together[3]) == _alone(model, prompts[3], 16, repetition_penalty=1.3)
    # different seeds give different samples (the seed is used, not ignored)
    assert tokens_of(together[0]) != tokens_of(
        _run(Engine(model, memory_budget=BUDGET), [Request(prompts[0], 16, 0.9, seed=7)])[0]
    )
    assert make_sampler(0.9)(mx.zeros((1, 8)), key=mx.random.key(1)).shape == (1,)


def test_logprobs_match_full_recompute(models):
    model = models["dense"]
    prompt = _prompt(5, 12)
    (evs,) = _run(Engine(model, memory_budget=BUDGET), [Request(prompt, 6, logprobs=3)])
    ids = prompt + tokens_of(evs)
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for i, ev in enumerate(evs):
        row = ref[len(prompt) - 1 + i]
        assert ev.logprob == pytest.approx(float(row[ev.token]), abs=1e-4)
        assert [t for t, _ in ev.top_logprobs] == np.argsort(-row)[:3].tolist()
        assert ev.top_logprobs[0][0] == ev.token  # greedy: the chosen token is the top one


@pytest.mark.parametrize("family", ["dense", "qwen2_moe", "deepseek-v3"])
def test_prefix_reuse_gives_the_same_tokens(models, family):
    """A prompt that extends an earlier request (its prompt and its answer), and one that
    leaves it mid-way, reuse the stored prefix and still produce the tokens of an empty cache."""
    model = models[family]
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=16)
    first = _prompt(1, 30)
    (evs,) = _run(engine, [Request(first, max_tokens=10)])
    answer = tokens_of(evs)
    extends = first + answer + _prompt(2, 9)
    forks = first[:20] + _prompt(3, 7)
    got = _run(engine, [Request(extends, 12), Request(forks, 12)])
    assert got[0][-1].cached_tokens == len(first) + len(answer) - 1  # prompt + answer fed back
    # the two prefill together: 9 new positions each, so the fork (6 new tokens after its 20
    # cached ones) recomputes its last 3 cached positions
    assert got[1][-1].cached_tokens == 17
    assert tokens_of(got[0]) == _alone(model, extends, 12)
    assert tokens_of(got[1]) == _alone(model, forks, 12)
    assert engine.stats.cached_tokens == got[0][-1].cached_tokens + 17
    # alone, the fork reuses all 20
    (alone,) = _run(engine, [Request(forks[:20] + _prompt(4, 7), 4)])
    assert alone[-1].cached_tokens == 20


@pytest.mark.parametrize("family", ["dense", "deepseek-v3"])
def test_requests_sharing_a_new_prefix_compute_it_once(models, family):
    """Four requests that arrive together under one long new prefix (an agent's sub-tasks under
    its system prompt): the first prefills it, the others wait for it to be stored and prefill
    only their own tail; tokens equal each request alone. A request sharing only a few tokens
    does not wait. A waiting request can be cancelled."""
    model = models[family]
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=64)
    system = _prompt(5, 100)
    tails = [_prompt(10 + i, 12) for i in range(4)]
    other = system[:20] + _prompt(9, 40)  # shares 20 tokens only: prefilled at once
    reqs = [Request(system + t, max_tokens=6) for t in tails] + [Request(other, max_tokens=6)]
    got = _run(engine, reqs)
    for r, evs in zip(reqs, got, strict=True):
        assert tokens_of(evs) == _alone(model, r.prompt, 6)
    assert [evs[-1].cached_tokens for evs in got] == [0, 100, 100, 100, 0]
    assert engine.stats.prefill_tokens == 111 + 3 * 11 + 59
    # a waiting follower that is cancelled ends at once; its leader is unaffected (a decoding
    # request keeps the prefill to one chunk per step)
    busy = engine.submit(Request(_prompt(7, 5), max_tokens=20))
    engine.step()
    lead = engine.submit(Request(_prompt(6, 100) + [1], max_tokens=3))
    follow = engine.submit(Request(_prompt(6, 100) + [2], max_tokens=3))
    engine.step()
    assert [s.id for s in engine._prefilling[0].followers] == [follow]
    engine.cancel(follow)
    reasons = {}
    while engine.busy:
        for ev in engine.step():
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
    assert reasons == {follow: "cancelled", lead: "length", busy: "length"}


def _drafting(model, kind: str) -> dict:
    """Engine arguments: the model's 4-bit copy as a draft model, or an MTP layer (the model's
    last block copied into it, as ``finetune --mtp`` starts)."""
    if kind == "draft":
        return dict(draft=quantized_copy(model))
    from mlxllm.speculative import mtp_layer
    from mlxllm.speculative.train import copy_last_block

    mx.random.seed(5)
    layer = mtp_layer(model)
    copy_last_block(model, layer)
    return dict(mtp=layer)


@pytest.mark.parametrize("kind", ["draft", "mtp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_engine_equals_alone(models, family, kind):
    """A draft model (the model's 4-bit copy) or an MTP layer in the engine, batching on:
    requests of several lengths, one joining mid-way, one with a repetition penalty (decoded
    plainly inside the window), one with logprobs, a second round from the prefix store; every
    greedy output equals the request alone, and fewer steps than tokens ran."""
    model = models[family]
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=16, num_draft=3,
                    **_drafting(model, kind))  # fmt: skip
    prompts = [_prompt(40 + i, n) for i, n in enumerate([5, 23, 40, 11])]
    reqs = [Request(p, max_tokens=18) for p in prompts]
    reqs[2] = Request(prompts[2], max_tokens=18, repetition_penalty=1.3)
    reqs[3] = Request(prompts[3], max_tokens=18, logprobs=2)
    late = Request(_prompt(50, 14), max_tokens=12)
    got = _run(engine, reqs, joins=[(3, late)])
    for r, evs in zip([*reqs, late], got, strict=True):
        assert tokens_of(evs) == _alone(model, r.prompt, r.max_tokens,
                                        repetition_penalty=r.repetition_penalty)  # fmt: skip
    for ev in got[3][:-1]:
        assert ev.logprob <= 0 and ev.top_logprobs[0][0] == ev.token
    assert engine.stats.decode_steps < engine.stats.generated_tokens / len(reqs)
    again = _run(engine, [Request(prompts[1] + [7], max_tokens=10)])
    assert again[0][-1].cached_tokens > 0
    assert tokens_of(again[0]) == _alone(model, prompts[1] + [7], 10)


@pytest.mark.parametrize("family", ["dense", "deepseek-v3"])
def test_mtp_engine_caches_hold_the_committed_sequence(models, family):
    """After MTP windows (drafts written, rejected ones trimmed, the window rewritten from the
    model's hidden states), the stored caches of a finished request are those of one direct
    pass over its committed tokens: the hidden-state cache the model's final hidden states, the
    MTP layer's cache its entries for (hidden ``j - 1``, token ``j``), zeros before the first.
    (This random head's drafts are all rejected; the trained head's in ``test_mtp_train`` are
    kept.)"""
    from mlxllm.speculative.mtp import new_cache

    model = models[family]
    spec = _drafting(model, "mtp")
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=16, num_draft=3, **spec)
    prompt = _prompt(44, 19)
    (evs,) = _run(engine, [Request(prompt, max_tokens=24)])
    ids = prompt + tokens_of(evs)[:-1]  # the last token is emitted, never fed
    n, states = engine.store.lookup(ids)
    assert n == len(ids)
    x = mx.array([ids])
    h = model.model(x)
    layers = len(model.layers)
    np.testing.assert_allclose(np.array(states[layers + 1][0][:, 0]), np.array(h), atol=1e-5)
    direct = new_cache(model)
    pairs = mx.concatenate([mx.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    spec["mtp"](pairs, model.model.embed_tokens(x), cache=direct)
    for got, want in zip(states[layers], direct.state, strict=True):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def test_speculative_engine_samples_the_models_distribution(models):
    """Sampled requests in a speculative batch (temperature 1, top-k 5): the second token over
    many requests, each with its own seed, follows its exact distribution (chi-square)."""
    from test_speculative import _chi2_ok

    from mlxllm.generation.sample import distribution

    model = models["dense"]
    prompt = [11, 200, 37]
    probs = distribution(temperature=1.0, top_k=5)
    p1 = probs(model(mx.array([prompt]))[0, -1])
    first = np.flatnonzero(np.array(p1) > 0)
    p2 = probs(model(mx.array([prompt + [int(t)] for t in first]))[:, -1])
    exact = np.array(p1)[first] @ np.array(p2)
    engine = Engine(model, memory_budget=BUDGET, draft=quantized_copy(model), num_draft=2,
                    max_batch=64, prefix_cache_bytes=0, max_queued=1000)  # fmt: skip
    reqs = [Request(prompt, max_tokens=2, temperature=1.0, top_k=5, seed=i) for i in range(600)]
    got = _run(engine, reqs)
    counts = np.bincount([tokens_of(evs)[1] for evs in got], minlength=model.config.vocab_size)
    assert _chi2_ok(counts.astype(float), exact)


def test_eviction_under_a_small_budget_keeps_results(models):
    model = models["dense"]
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x float32
    engine = Engine(model, memory_budget=BUDGET, prefix_cache_bytes=40 * per_token)
    prompts = [_prompt(20 + i, 25) for i in range(4)]
    for p in prompts + prompts[::-1]:
        (evs,) = _run(engine, [Request(p, 8)])
        assert tokens_of(evs) == _alone(model, p, 8)
        assert engine.store.nbytes <= 40 * per_token
    assert 0 < engine.store.tokens <= 40
    # the most recent request (25 prompt + 7 fed-back tokens) is what was kept
    assert engine.store.tokens == 32 and engine.store.lookup(prompts[0])[0] == 25


def test_prefix_store_shares_and_splits():
    """Shared prefixes are stored once; lookups may end inside an edge."""
    store = PrefixStore(1 << 20)

    def states(ids):  # one layer, one array whose values are the token ids
        return [[mx.array(np.array(ids, np.float32).reshape(1, 1, -1, 1))]]

    store.insert([1, 2, 3, 4], states([1, 2, 3, 4]))
    store.insert([1, 2, 9], states([1, 2, 9]))
    assert store.tokens == 5  # [1, 2] shared, then [3, 4] and [9]
    n, got = store.lookup([1, 2, 3, 7])
    assert n == 3 and np.array(got[0][0]).ravel().tolist() == [1, 2, 3]
    n, got = store.lookup([1, 2, 9, 9], limit=3)
    assert n == 3 and np.array(got[0][0]).ravel().tolist() == [1, 2, 9]
    assert store.lookup([5])[0] == 0
    assert store.nbytes == 5 * 4
    store.evict(limit=0)
    assert store.nbytes == 0 and store.tokens == 0


def test_cancel_frees_memory_and_the_queue_is_bounded(models):
    model = models["dense"]
    mx.eval(model.parameters())
    engine = Engine(model, memory_budget=BUDGET, prefix_cache_bytes=0, max_queued=2)
    keep = engine.submit(Request(_prompt(1, 8), max_tokens=200))
    for _ in range(3):
        engine.step()
    base = mx.get_active_memory()
    long = engine.submit(Request(_prompt(2, 200), max_tokens=1000))
    for _ in range(8):
        engine.step()
    grown = mx.get_active_memory()
    assert grown - base > 100_000  # the long row pads the batch to its length
    engine.cancel(long)
    events = engine.step()
    assert [e.finish_reason for e in events if e.request_id == long] == ["cancelled"]
    freed = mx.get_active_memory()
    assert grown - freed > 0.8 * (grown - base)
    assert [s.id for s in engine.rows] == [keep]
    # waiting requests: at most max_queued, then a clear error
    engine.submit(Request([1, 2], 4))
    engine.submit(Request([1, 2], 4))
    with pytest.raises(QueueFull, match="max_queued=2"):
        engine.submit(Request([1, 2], 4))


def test_admission_waits_for_memory_and_refuses_what_never_fits(models):
    model = models["dense"]
    probe = Engine(model, memory_budget=BUDGET)
    bpt = probe._bytes_per_token()
    # a request reserves (prompt + max_tokens + a 256-position growth block) x rows: 316 each
    engine = Engine(model, memory_budget=700 * bpt, prefix_cache_bytes=0)
    a, b = Request(_prompt(1, 20), 40), Request(_prompt(2, 20), 40)
    huge = Request(_prompt(3, 20), max_tokens=5000)
    sizes = []
    got = _run(engine, [a, b, huge], until=lambda e, s: sizes.append(len(e.rows)))
    assert max(sizes) == 2  # a and b fit together
    assert got[2][-1].finish_reason == "error" and "memory_budget" in got[2][-1].error
    tight = Engine(model, memory_budget=400 * bpt, prefix_cache_bytes=0)
    sizes = []
    got = _run(tight, [a, b], until=lambda e, s: sizes.append(len(e.rows)))
    assert max(sizes) == 1  # b waited for a
    assert tokens_of(got[1]) == _alone(model, b.prompt, 40)
    with pytest.raises(InvalidArgument, match="top-p"):
        engine.submit(Request([1], top_p=0))
    with pytest.raises(InvalidArgument, match="empty"):
        engine.submit(Request([]))


@pytest.fixture(scope="module")
def smol():
    return load(fixture_model(SMOL), dtype=mx.float32)


def test_tokens_reach_handles_before_a_prefill_chunk_and_first_tokens_are_not_held(models):
    """Latency of the step order, pipelined (as on a GPU). A row that just joined gets its
    first token in the step that decodes it (not one step later, behind the next queued
    call); and while another prompt is prefilled in chunks, every token a step made is
    already with its handle when the step's prefill chunk starts."""
    model = models["dense"]
    engine = Engine(model, memory_budget=BUDGET, prefill_chunk=8, prefix_cache_bytes=0,
                    pipeline=True)  # fmt: skip
    h = engine.open(Request(_prompt(1, 6), max_tokens=12))
    assert engine.step() == []  # idle: the prompt is prefilled and joins
    first = engine.step()  # its first decode call
    assert [(e.request_id, e.generation_tokens) for e in first] == [(h.id, 1)]
    seen = []
    chunk = engine._prefill_chunk

    def spy(group, budget):
        row = next(s for s in engine.rows if s.id == h.id)
        seen.append((len(row.generated), len(h._events)))  # generated, delivered
        return chunk(group, budget)

    engine._prefill_chunk = spy
    later = engine.open(Request(_prompt(2, 40), max_tokens=3))
    while engine.busy:
        engine.step()
    assert len(seen) >= 4 and all(g == d for g, d in seen)  # nothing held back
    assert tokens_of(list(h._events)) == _alone(model, _prompt(1, 6), 12)
    assert tokens_of(list(later._events)) == _alone(model, _prompt(2, 40), 3)


def test_an_idle_engine_gathers_a_burst_into_one_prefill(models):
    """Requests that arrive together at an idle background engine are prefilled as one group:
    it waits while they keep coming or ``arrivals()`` says more are being prepared (a server
    counts the requests it is still parsing), up to ``gather`` seconds; a lone request is not
    held for the whole window. With ``gather=0`` the first request runs alone."""
    model = models["dense"]
    prompts = [_prompt(20 + i, 10) for i in range(3)]

    def burst(gather, announce):
        pending = [len(prompts) if announce else 0]
        engine = Engine(model, memory_budget=BUDGET, prefix_cache_bytes=0, gather=gather,
                        arrivals=lambda: pending[0])  # fmt: skip
        groups, chunk = [], engine._prefill_chunk

        def spy(group, budget):
            groups.append(len(group.seqs))
            return chunk(group, budget)

        engine._prefill_chunk = spy
        engine.start()
        try:
            handles = []
            for i, p in enumerate(prompts):
                if i:
                    time.sleep(0.03)  # parsing the next request: longer than a tick
                handles.append(engine.open(Request(p, max_tokens=4)))
                pending[0] = max(0, pending[0] - 1)
            for hd, p in zip(handles, prompts, strict=True):
                assert tokens_of(list(hd)) == _alone(model, p, 4)
        finally:
            engine.stop()
        return groups

    assert burst(gather=10.0, announce=True)[0] == 3
    assert burst(gather=0.0, announce=True)[0] == 1
    # nothing announced and 30 ms between requests: the burst ends at the first quiet tick
    assert burst(gather=10.0, announce=False)[0] == 1
    engine = Engine(model, memory_budget=BUDGET, gather=10.0)
    engine.start()
    try:
        t = time.perf_counter()
        list(engine.open(Request(prompts[0], max_tokens=2)))
        assert time.perf_counter() - t < 5.0  # not held for the 10 s window
    finally:
        engine.stop()


def test_handles_in_threads_and_asyncio_with_stop_strings(smol):
    """The background engine serves a thread and asyncio tasks at once; text deltas join to
    the text of the tokens, stop strings cut the text and end the request."""
    model, tok = smol
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Count from 1 to 20, comma separated."}],
        add_generation_prompt=True), add_special_tokens=False)  # fmt: skip
    ref = _alone(model, prompt, 40)
    ref_text = tok.decode([t for t in ref if t not in tok.eos_token_ids])
    engine = Engine(model, tok.eos_token_ids, memory_budget=BUDGET)
    engine.start()
    try:
        results = {}

        def reader():
            h = engine.open(Request(prompt, 40), tokenizer=tok)
            evs = list(h)
            results["thread"] = ("".join(e.text for e in evs), tokens_of(evs))

        t = threading.Thread(target=reader)
        t.start()

        async def main():
            stop = ref_text[10:14]
            h1 = engine.open(Request(prompt, 40), tokenizer=tok, stop=[stop])
            h2 = engine.open(Request(prompt, 40), tokenizer=tok)
            got = []
            for h in (h1, h2):
                got.append([e async for e in h])
            return stop, got

        stop, (cut, full) = asyncio.run(main())
        t.join(timeout=120)
        assert results["thread"][1] == ref
        assert "".join(e.text for e in full) == ref_text == results["thread"][0]
        text = "".join(e.text for e in cut)
        assert text == ref_text[: ref_text.find(stop)] and cut[-1].finish_reason == "stop"
    finally:
        engine.stop()


@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_real_models_batched_equal_alone(name):
    """Real checkpoints (float32): four chat prompts at once, greedy, each equal to alone;
    then a follow-up turn reuses the first conversation from the prefix store."""
    model, tok = load(fixture_model(name), dtype=mx.float32)
    questions = ["What is MLX?", "Write a haiku about rain.", "Name three prime numbers.",
                 "Translate 'good morning' to French."]  # fmt: skip
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True), add_special_tokens=False)
        for q in questions
    ]  # fmt: skip
    engine = Engine(model, tok.eos_token_ids, memory_budget=BUDGET, prefill_chunk=16)
    got = _run(engine, [Request(p, 20) for p in prompts])
    for p, evs in zip(prompts, got, strict=True):
        want = _alone(model, p, 20)
        if set(want) & tok.eos_token_ids:  # the engine stops at eos (and reports it)
            want = want[: min(want.index(e) for e in tok.eos_token_ids if e in want) + 1]
        assert tokens_of(evs) == want
    answer = tok.decode([t for t in tokens_of(got[0]) if t not in tok.eos_token_ids])
    turn2 = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": answer},
         {"role": "user", "content": "Say it shorter."}], add_generation_prompt=True),
        add_special_tokens=False)  # fmt: skip
    (evs,) = _run(engine, [Request(turn2, 12)])
    assert evs[-1].cached_tokens >= len(prompts[0])
    assert tokens_of(evs) == _alone(model, turn2, 12)[: len(tokens_of(evs))]
