"""Samplers, stop strings, prompt-cache reuse and the step engine on a tiny model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_tiny_hf
from mlxllm import generate, load, stream_generate
from mlxllm.cache import PromptCache
from mlxllm.generation import sample
from mlxllm.generation.step import generate_step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    make_tiny_hf("qwen2-untied", path, seed=3)
    model, tok = load(path, dtype=mx.float32)
    return model, tok


def test_top_k_top_p_min_p_masks():
    logits = mx.log(mx.array([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda x: (np.array(x) > -np.inf).tolist()[0]  # noqa: E731
    assert kept(sample.apply_top_k(logits, 2)) == [True, True, False, False]
    # 0.5 < 0.7 -> keep 2nd; 0.75 >= 0.7 -> stop before the 3rd
    assert kept(sample.apply_top_p(logits, 0.7)) == [True, True, False, False]
    assert kept(sample.apply_top_p(logits, 0.76)) == [True, True, True, False]
    # min_p 0.3 of the top (0.5) = 0.15: drop only 0.1
    assert kept(sample.apply_min_p(logits, 0.3)) == [True, True, True, False]
    # unsorted input keeps positions
    shuffled = logits[:, mx.array([2, 0, 3, 1])]
    assert kept(sample.apply_top_p(shuffled, 0.7)) == [False, True, False, True]


def test_sampling_follows_distribution_and_seed():
    probs = np.array([0.6, 0.3, 0.1])
    s = sample.make_sampler(temperature=1.0)
    mx.random.seed(0)
    draws = np.array(s(mx.log(mx.array(np.tile(probs, (4000, 1))))))
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    mx.random.seed(7)
    a = np.array(s(mx.log(mx.array(np.tile(probs, (64, 1))))))
    mx.random.seed(7)
    b = np.array(s(mx.log(mx.array(np.tile(probs, (64, 1))))))
    assert (a == b).all()
    assert sample.make_sampler(0.0) is sample.greedy


def test_repetition_penalty():
    p = sample.repetition_penalty(2.0)
    out = np.array(p([0, 1], mx.array([[2.0, -2.0, 2.0]])))
    np.testing.assert_allclose(out, [[1.0, -4.0, 2.0]])


def test_stream_equals_generate_and_step(tiny):
    model, tok = tiny
    ids = tok.encode("hello world, this is a test")
    tokens = list(generate_step(model, ids, model.make_cache(), max_tokens=20))
    text = generate(model, tok, ids, max_tokens=20)
    cut = next((i for i, t in enumerate(tokens) if t in tok.eos_token_ids), len(tokens))
    assert text == tok.decode(tokens[:cut])
    chunks = list(stream_generate(model, tok, ids, max_tokens=20))
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].generation_tokens == min(20, cut + 1)


def test_stop_string_is_cut_and_not_emitted(tiny):
    model, tok = tiny
    ids = tok.encode("the quick brown fox")
    full = generate(model, tok, ids, max_tokens=24)
    assert len(full) > 12, full
    stop = full[8:11]  # a stop string that first appears at or before position 8
    first = full.find(stop)
    chunks = list(stream_generate(model, tok, ids, max_tokens=24, stop=[stop]))
    assert "".join(c.text for c in chunks) == full[:first]
    assert chunks[-1].finish_reason == "stop"


def test_prefill_chunks_do_not_change_tokens(tiny):
    model, tok = tiny
    ids = np.random.default_rng(0).integers(0, 49152, 40).tolist()
    a = list(generate_step(model, ids, model.make_cache(), max_tokens=8, prefill_chunk=512))
    b = list(generate_step(model, ids, model.make_cache(), max_tokens=8, prefill_chunk=7))
    assert a == b


def test_prompt_cache_reuses_the_conversation(tiny):
    model, tok = tiny
    cache = PromptCache(model)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    first = list(stream_generate(model, tok, msgs, max_tokens=6, cache=cache))
    reply = "".join(c.text for c in first)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More!"}]
    second = list(stream_generate(model, tok, msgs, max_tokens=6, cache=cache))
    total = len(tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False))
    # only the new turn (plus at most the template's re-rendering of the reply end) is run
    assert second[-1].prompt_tokens < total // 2, (second[-1].prompt_tokens, total)
    fresh = list(stream_generate(model, tok, msgs, max_tokens=6))
    assert fresh[-1].prompt_tokens == total
    assert "".join(c.text for c in second) == "".join(c.text for c in fresh)
    assert cache.offset == len(cache.ids)


def test_kv_cache_grows_past_a_block_after_content():
    """A long chunk after a short history (a chat turn with a long prompt) must fit."""
    from mlxllm.cache import KVCache
    from mlxllm.cache.latent import LatentCache

    kv, lat = KVCache(), LatentCache()
    for L in (3, 600, 1, 300):
        k = mx.random.normal((1, 2, L, 8))
        mask = kv.make_mask(L)
        keys, _ = kv.update_and_fetch(k, k)
        ck, kp = lat.update_and_fetch(k[:, :1], k[:, :1, :, :4])
        if L == 3:  # a few queries see keys up to the block's end, the rest masked
            assert keys.shape[2] == 256 and mask.shape == (3, 256)
            assert np.array(mask).sum(axis=1).tolist() == [1, 2, 3]
        else:
            assert keys.shape[2] == kv.offset
        assert ck.shape[2] == kp.shape[2] == lat.offset
        np.testing.assert_array_equal(np.array(keys[:, :, kv.offset - L : kv.offset]), np.array(k))
        np.testing.assert_array_equal(np.array(ck[:, :, -L:]), np.array(k[:, :1]))
    assert kv.offset == lat.offset == 904
