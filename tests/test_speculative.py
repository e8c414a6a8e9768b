# ruff: noqa: F811 (tests take the imported ``models`` fixture by name)
"""Speculative decoding (mlxllm/speculative): lossless against plain decoding, the sampling
distribution against the model's exact one, the MTP layer against the equations.

The oracle of every greedy test is ``generate_step`` (plain decoding, covered against
transformers by the family parity tests); of the sampling tests, the model's own next-token
distribution computed exhaustively.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_deepseek import make_tiny_deepseek
from test_engine import FAMILIES, models  # noqa: F401 (the fixture: tiny models per family)

from helpers import QWEN, SMOL, fixture_model, quantized_copy
from mlxllm import generate, load
from mlxllm.generation.sample import repetition_penalty
from mlxllm.generation.step import generate_step
from mlxllm.loader import load_model
from mlxllm.models.base import DecoderBlock
from mlxllm.speculative import (
    DraftModel,
    MTPDrafter,
    SpecStats,
    accept,
    from_checkpoint,
    load_head,
    mtp_layer,
    save_head,
    speculative_generate_step,
)
from mlxllm.speculative.mtp import new_cache


def _quantized(model, bits=4, group_size=32):
    return quantized_copy(model, bits, group_size)


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _drafter(kind: str, model):
    if kind == "self":  # the model drafts for itself: every draft is kept
        return DraftModel(model)
    if kind == "quantized":  # some kept, some rejected
        return DraftModel(_quantized(model))
    mx.random.seed(7)
    return MTPDrafter(model, mtp_layer(model))  # an untrained head: nearly all rejected


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["self", "quantized", "mtp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculation_equals_plain_decoding(models, family, kind, k):
    model = models[family]
    prompt = _prompt(1, 21, model.config.vocab_size)
    want = list(generate_step(model, prompt, model.make_cache(), max_tokens=30))
    stats = SpecStats()
    got = list(speculative_generate_step(model, _drafter(kind, model), prompt,
                                         model.make_cache(), num_draft=k, max_tokens=30,
                                         stats=stats))  # fmt: skip
    assert got == want
    kept = sum(stats.accepted)
    if kind == "self":
        assert stats.acceptance == [1.0] * k  # all kept: 30 tokens in ceil(29 / (k + 1)) rounds
        assert stats.rounds == -(-29 // (k + 1))
    elif kind == "quantized":
        assert 0 < kept < sum(stats.drafted)  # the accept and the reject paths both ran


def test_greedy_with_repetition_penalty_and_a_one_token_prompt(models):
    model = models["dense"]
    proc = [repetition_penalty(1.3)]
    for prompt in ([5], _prompt(2, 12, model.config.vocab_size)):
        want = list(generate_step(model, prompt, model.make_cache(), max_tokens=24,
                                  logits_processors=proc))  # fmt: skip
        got = list(speculative_generate_step(model, DraftModel(_quantized(model)), prompt,
                                             model.make_cache(), num_draft=2, max_tokens=24,
                                             logits_processors=proc))  # fmt: skip
        assert got == want


# ---------------------------------------------------------------------------------------------
# sampling: the emitted tokens are distributed as the model's own


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's statistic, tokens of expected count < 5 pooled."""
    big = probs * counts.sum() >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(probs[big], probs[~big].sum()) * counts.sum()
    keep = exp > 0
    return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum() - 1)


def _chi2_ok(counts, probs) -> bool:
    """True unless the counts are implausible under ``probs`` at p < 1e-4 (Wilson-Hilferty)."""
    stat, dof = _chi2(counts, probs)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof))
    return z < 3.72


def test_accept_leaves_the_models_distribution():
    """The token after the drafts at the first position that is not simply copied: over many
    draws of drafts from ``q``, the first emitted token is distributed as ``p[0]`` (chi-square,
    p < 1e-4 rejects); the draft's own distribution is rejected by the same test."""
    rng = np.random.default_rng(0)
    V, k, n = 12, 3, 6000
    p = mx.array(rng.dirichlet(np.ones(V) * 0.7, size=k + 1).astype(np.float32))
    q = mx.array(rng.dirichlet(np.ones(V) * 0.7, size=k).astype(np.float32))
    counts, draft_counts = np.zeros(V), np.zeros(V)
    keys = mx.random.split(mx.random.key(1), n)
    drafts_all = np.stack([rng.choice(V, size=n, p=np.array(q[i]) / np.array(q[i]).sum())
                           for i in range(k)], axis=1)  # fmt: skip
    for j in range(n):
        drafts = drafts_all[j].tolist()
        a, t = accept(drafts, p, q, keys[j])
        counts[drafts[0] if a > 0 else t] += 1
        draft_counts[drafts[0]] += 1
    assert _chi2_ok(counts, np.array(p[0]))
    assert not _chi2_ok(draft_counts, np.array(p[0]))  # the test can tell them apart


def test_sampled_tokens_follow_the_models_distribution(models):
    """End to end on the tiny dense model (temperature 1, top-k 6: a small support), with a
    quantized draft: the second generated token (the first a draft can decide) over many runs
    matches its exact distribution, the sum over the first token of p(t1) p(t2 | t1)."""
    model = models["dense"]
    draft = DraftModel(_quantized(model))
    prompt = [17, 3, 99]
    settings = dict(temperature=1.0, top_k=6)
    from mlxllm.generation.sample import distribution

    probs = distribution(**settings)
    p1 = probs(model(mx.array([prompt]))[0, -1])
    first = np.flatnonzero(np.array(p1) > 0)
    rows = mx.array([prompt + [int(t)] for t in first])
    p2 = probs(model(rows)[:, -1])  # [len(first), V]
    exact = np.array(p1)[first] @ np.array(p2)
    n, counts = 800, np.zeros(model.config.vocab_size)
    kept = 0
    for i in range(n):
        draft.trim_to(0)
        stats = SpecStats()
        out = list(speculative_generate_step(model, draft, prompt, model.make_cache(),
                                             num_draft=1, max_tokens=2, key=mx.random.key(i),
                                             stats=stats, **settings))  # fmt: skip
        counts[out[1]] += 1
        kept += sum(stats.accepted)
    assert 0.1 * n < kept < 0.95 * n  # drafts were both kept and rejected
    assert _chi2_ok(counts, exact)


# ---------------------------------------------------------------------------------------------
# the MTP layer against the V3 report's equations


def _rms(x, w, eps):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _mtp_direct(model, layer, ids: list[int]) -> mx.array:
    """MTP logits at every position from the equations (no cache): position i reads the
    model's final hidden state h_i and the embedding of token i + 1 (DeepSeek's released
    weights concatenate [embedding; hidden], as vLLM and SGLang read them), one full causal pass
    of the block, then the model's head after the MTP's own norm."""
    eps = model.config.rms_norm_eps
    x = mx.array([ids])
    h = model.model(x)[:, :-1]
    e = model.model.embed_tokens(x)[:, 1:]
    joined = mx.concatenate([_rms(e, layer.enorm.weight, eps), _rms(h, layer.hnorm.weight, eps)],
                            axis=-1)  # fmt: skip
    z = joined @ layer.eh_proj.weight.T
    block_out = DecoderBlock.__call__(layer, z, "causal", None)  # the family's block, no cache
    return model.head(_rms(block_out, layer.shared_head.norm.weight, eps))


@pytest.mark.parametrize("family", ["dense", "deepseek-v3"])
def test_mtp_cached_with_rollback_equals_the_equations(models, family):
    """Cached MTP calls (a prefill, chained drafts, a trim after rejection, the corrected
    continuation) give the logits of the direct computation over the committed sequence."""
    model = models[family]
    mx.random.seed(3)
    layer = mtp_layer(model)
    ids = _prompt(4, 24, model.config.vocab_size)
    want = _mtp_direct(model, layer, ids)[0]  # [23, V]
    cache = new_cache(model)
    x = mx.array([ids])
    h = model.model(x)
    e = model.model.embed_tokens(x)
    got = [layer.logits(model, layer(h[:, :10], e[:, 1:11], cache))]
    # three drafted positions on wrong tokens, then rolled back
    wrong = model.model.embed_tokens(mx.array([[1, 2, 3]]))
    layer(h[:, 10:13], wrong, cache)
    cache.trim(3)
    for i in range(10, 23):  # then one position at a time
        got.append(layer.logits(model, layer(h[:, i : i + 1], e[:, i + 1 : i + 2], cache)))
    got = mx.concatenate(got, axis=1)[0]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_deepseek_v3_mtp_weights_load_into_the_layer(tmp_path):
    """A V3 checkpoint whose MTP layer (``model.layers.{N}.*``, per-expert MoE names, a
    separate kv_b) is stored beside the model: ``from_checkpoint`` builds the layer from those
    weights (the direct equations on the raw tensors agree), and greedy MTP speculation equals
    plain decoding."""
    from safetensors.numpy import load_file, save_file

    make_tiny_deepseek("v3-yarn", tmp_path, seed=5, num_nextn_predict_layers=1)
    tensors = load_file(tmp_path / "model.safetensors")
    n, last = 3, "model.layers.2."
    rng = np.random.default_rng(1)
    mtp = {f"model.layers.{n}.{k[len(last):]}": (rng.normal(size=v.shape) * 0.1).astype(v.dtype)
           for k, v in tensors.items() if k.startswith(last)}  # fmt: skip
    for k in [k for k in mtp if "norm" in k] + [
        f"model.layers.{n}.{x}.weight" for x in ("enorm", "hnorm", "shared_head.norm")
    ]:
        mtp[k] = (1 + 0.1 * rng.normal(size=64)).astype(np.float32) if k.endswith(
            ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")) else mtp[k]  # fmt: skip
    mtp[f"model.layers.{n}.eh_proj.weight"] = (rng.normal(size=(64, 128)) * 0.1).astype(np.float32)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    mtp[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"]
    save_file({**tensors, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = load_model(tmp_path, dtype=mx.float32)
    layer = from_checkpoint(model)
    assert layer is not None
    np.testing.assert_array_equal(np.array(layer.eh_proj.weight),
                                  mtp[f"model.layers.{n}.eh_proj.weight"])  # fmt: skip
    np.testing.assert_array_equal(np.array(layer.enorm.weight),
                                  mtp[f"model.layers.{n}.enorm.weight"])  # fmt: skip
    # the stacked experts hold the stored per-expert tensors
    up = np.array(layer.mlp.experts.up_proj.weight)
    np.testing.assert_array_equal(up[3], mtp[f"model.layers.{n}.mlp.experts.3.up_proj.weight"])
    prompt = _prompt(6, 20, 512)
    want = list(generate_step(model, prompt, model.make_cache(), max_tokens=20))
    got = list(
        speculative_generate_step(
            model, MTPDrafter(model, layer), prompt, model.make_cache(), num_draft=2, max_tokens=20
        )
    )
    assert got == want


def test_head_files_round_trip_and_refuse_another_model(models, tmp_path):
    from mlxllm.errors import MlxllmError

    model = models["dense"]
    layer = mtp_layer(model)
    path = tmp_path / "head.safetensors"
    save_head(layer, path, {"model": "tiny-dense"})
    again = load_head(model, path)
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(layer.parameters()), tree_flatten(again.parameters()),
                              strict=True):  # fmt: skip
        assert np.array_equal(np.array(a), np.array(b)), k
    with pytest.raises(MlxllmError, match="does not fit this model"):
        load_head(models["deepseek-v3"], path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MlxllmError, match="cannot read MTP head"):
        load_head(model, tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# real weights


@pytest.mark.parametrize("name", [SMOL, QWEN])
def test_real_models_with_a_quantized_draft_generate_the_same_text(name):
    """The fixture in float32, its 4-bit copy as the draft: the same text as plain greedy
    decoding through ``generate`` (chat template, detokenizer), most drafts kept; a chat's
    second turn reuses both caches."""
    from mlxllm.cache import PromptCache

    model, tok = load(fixture_model(name), dtype=mx.float32)
    drafter = DraftModel(_quantized(model, group_size=64))
    ask = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    n = 40 if name == SMOL else 24
    want = generate(model, tok, ask, max_tokens=n)
    cache = PromptCache(model)
    got = generate(model, tok, ask, max_tokens=n, drafter=drafter, num_draft=3, cache=cache)
    assert got == want
    if name == QWEN:
        return  # the second turn once, on the small model
    turn2 = ask + [{"role": "assistant", "content": got},
                   {"role": "user", "content": "Now in one line."}]  # fmt: skip
    want2 = generate(model, tok, turn2, max_tokens=24)
    assert generate(model, tok, turn2, max_tokens=24, drafter=drafter, cache=cache) == want2
