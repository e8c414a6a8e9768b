"""LoRA / DoRA adapters as transforms, and the fine-tuning data pipeline (tiny random models)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import make_tiny_hf
from mlxllm.errors import MlxllmError
from mlxllm.loader import load
from mlxllm.lora.data import batch_at, collate, encode_row, load_dataset, load_jsonl, make_batches
from mlxllm.lora.layers import (
    LoRALinear,
    adapter_weights,
    apply_lora,
    fuse_model,
    load_adapter,
    save_adapter,
)
from mlxllm.quant import make_predicate, quantize_model

IDS = mx.array([[1, 17, 300, 4000, 42, 9, 123, 7]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_hf("llama", path, seed=0, std=0.05)
    return path


def _model(path, bits=None):
    model, tok = load(path, dtype=mx.float32)
    if bits:
        quantize_model(model, make_predicate("uniform", bits, 32))
    return model, tok


def _randomize_b(model, seed=1):
    """A trained-looking adapter: B != 0 (and magnitudes moved for DoRA)."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
            if m.dora:
                m.magnitude = m.magnitude * (1 + 0.1 * mx.random.normal(m.magnitude.shape))


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("dora", [False, True])
def test_adapter_at_init_equals_base(tiny, bits, dora):
    model, _ = _model(tiny, bits)
    ref = model(IDS)
    apply_lora(model, rank=4, dora=dora)
    diff = mx.abs(model(IDS) - ref).max().item()
    print(f"bits={bits} dora={dora}: max |lora - base| at init = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("dora", [False, True])
def test_fused_equals_unfused(tiny, bits, dora):
    model, _ = _model(tiny, bits)
    base = model(IDS)
    apply_lora(model, rank=4, dora=dora, targets=("q_proj", "v_proj", "down_proj"))
    _randomize_b(model)
    unfused = model(IDS)
    assert mx.abs(unfused - base).max().item() > 1e-2  # the adapter does something
    fuse_model(model, dequantize=True)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    diff = mx.abs(model(IDS) - unfused).max().item()
    print(f"bits={bits} dora={dora}: max |fused - unfused| = {diff:.2e}")
    # float32 sums in another order: ~1e-6 on logits of magnitude ~1
    assert diff < 1e-4


def test_fuse_requantized_keeps_quantized_layers(tiny):
    """Fusing onto a 4-bit base re-quantizes with the base's settings: the same as fusing to
    float and quantizing that (the merge is right; only the extra rounding differs from LoRA)."""
    models = []
    for dequantize in (False, True):
        model, _ = _model(tiny, 4)
        mx.random.seed(0)  # the same lora_a in both
        apply_lora(model, rank=4)
        _randomize_b(model)
        fuse_model(model, dequantize=dequantize)
        models.append(model)
    requantized, float_fused = models
    q = requantized.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 32
    quantize_model(float_fused, make_predicate("uniform", 4, 32))
    diff = mx.abs(requantized(IDS) - float_fused(IDS)).max().item()
    assert diff < 1e-5


def test_only_adapters_trainable(tiny):
    model, _ = _model(tiny, 4)
    apply_lora(model, rank=4, num_layers=1, dora=True)
    names = set(adapter_weights(model))
    assert names and all(
        n.startswith("model.layers.1.") and n.rsplit(".", 1)[1] in ("lora_a", "lora_b", "magnitude")
        for n in names
    )
    assert {n.split(".")[3] for n in names} == {"self_attn"}
    # a gradient step only touches adapters
    loss_grad = nn.value_and_grad(model, lambda m, x: m(x).astype(mx.float32).mean())
    _, grads = loss_grad(model, IDS)
    assert set(dict(tree_flatten(grads))) == names


def test_save_load_roundtrip(tiny, tmp_path):
    model, _ = _model(tiny)
    apply_lora(model, rank=4, scale=10.0, targets=("q_proj", "o_proj"), num_layers=1, dora=True)
    _randomize_b(model)
    want = model(IDS)
    save_adapter(model, tmp_path / "ad")
    assert not [p for p in (tmp_path / "ad").iterdir() if p.name.startswith(".")]
    fresh, _ = _model(tiny)
    load_adapter(fresh, tmp_path / "ad")
    assert mx.abs(fresh(IDS) - want).max().item() < 1e-6
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["dora"] is True and cfg["targets"] == ["q_proj", "o_proj"]


# --------------------------------------------------------------------------------------------
# data


def _spans(ex):
    """Contiguous masked-in runs of token ids."""
    runs, cur = [], []
    for i, m in zip(ex.ids, ex.mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_chat_mask_covers_assistant_content_and_end_token(tiny):
    _, tok = _model(tiny)
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Zorbia?"},
            {"role": "assistant", "content": "Quelmport."},
            {"role": "user", "content": "And its river?"},
            {"role": "assistant", "content": "The Vess, 300 km long."},
        ]
    }
    ex = encode_row(tok, row)
    assert len(ex.ids) == len(ex.mask)
    spans = [tok.decode(s) for s in _spans(ex)]
    # SmolLM2's template: "<|im_start|>assistant\n" + content + "<|im_end|>" + "\n"
    assert spans == ["Quelmport.<|im_end|>", "The Vess, 300 km long.<|im_end|>"]
    everything = encode_row(tok, row, mask_prompt=False)
    assert everything.ids == ex.ids and all(everything.mask)


def test_prompt_completion_and_text_rows(tiny):
    _, tok = _model(tiny)
    ex = encode_row(tok, {"prompt": "Say hi", "completion": "Hi there!"})
    assert [tok.decode(s) for s in _spans(ex)] == ["Hi there!<|im_end|>"]
    assert "<|im_start|>user\nSay hi<|im_end|>" in tok.decode(ex.ids)
    ex = encode_row(tok, {"text": "Zorbia is small."})
    assert all(ex.mask) and ex.ids[-1] == tok.eos_token_id
    assert tok.decode(ex.ids[:-1]) == "Zorbia is small."


def test_tools_reach_the_template(tiny):
    _, tok = _model(tiny)
    tok._compiled_template = None
    tok.chat_template = (
        "{% if tools %}TOOLS:{{ tools | length }}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    ex = encode_row(tok, row)
    assert tok.decode(ex.ids).startswith("TOOLS:1\n")
    assert [tok.decode(s) for s in _spans(ex)] == ["yo<|im_end|>"]


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('{"prompt": "only a prompt"}', "prompt"),
        ('{"messages": "hi"}', "messages"),
        ('{"other": 1}', '"text"'),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tiny, tmp_path, line, words):
    _, tok = _model(tiny)
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(MlxllmError) as err:
        load_jsonl(path, tok)
    assert f"{path}:3:" in str(err.value) and words in str(err.value)


def test_batches_sorted_padded_masked_truncated(tiny, tmp_path):
    _, tok = _model(tiny)
    rows = [{"text": "word " * n} for n in (1, 30, 5, 12, 3, 20)]
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_dataset(tmp_path, tok, max_seq_length=16)
    assert max(len(e.ids) for e in data["train"]) == 16 and "test" not in data
    batches = make_batches(data["train"], 2)
    lengths = [[len(data["train"][i].ids) for i in b] for b in batches]
    assert lengths == sorted(lengths) and all(b[0] <= b[1] for b in lengths)
    # the same (index, seed) gives the same batch; each epoch visits every batch once
    epoch = [tuple(batch_at(batches, k, seed=3)) for k in range(len(batches))]
    assert sorted(epoch) == sorted(tuple(b) for b in batches)
    assert epoch == [tuple(batch_at(batches, k, seed=3)) for k in range(len(batches))]
    x, y, m = collate([data["train"][i] for i in batches[0]])
    short = len(data["train"][batches[0][0]].ids)
    assert x.shape == y.shape == m.shape == (2, lengths[0][1] - 1)
    assert m[0, short - 1 :].sum() == 0 and m[0, : short - 1].all()


# ---- stacked experts (Qwen2-MoE) ------------------------------------------------------------

EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from test_moe_qwen import _make_tiny

    path = tmp_path_factory.mktemp("moe")
    _make_tiny("qwen2_moe", path, seed=0)
    return path


def _moe_model(path, bits=None):
    from mlxllm.loader import load_model

    model = load_model(path, dtype=mx.float32)
    if bits:
        quantize_model(model, make_predicate("uniform", bits, 32))
    return model


@pytest.mark.parametrize("bits", [None, 4])
def test_lora_on_stacked_experts_fuses_and_starts_at_base(tiny_moe, bits):
    """Expert projections get per-expert adapters; at init they compute the base; trained-looking
    adapters fuse into stacked (re-quantized) experts with the same logits, on the sorted
    (prefill, 40 tokens x 2 experts) and unsorted (one token) paths."""
    from mlxllm.layers.moe import QuantizedSwitchLinear, SwitchLinear
    from mlxllm.lora.layers import LoRASwitchLinear

    ids = mx.array([list(range(3, 43))])
    base = _moe_model(tiny_moe, bits)
    ref = base(ids)
    model = _moe_model(tiny_moe, bits)
    apply_lora(model, rank=4, targets=EXPERT_TARGETS)
    experts = model.layers[1].mlp.experts
    assert all(isinstance(experts[p], LoRASwitchLinear) for p in EXPERT_TARGETS)
    assert isinstance(model.layers[1].mlp.shared_expert.gate_proj, LoRALinear)
    np.testing.assert_allclose(np.array(model(ids)), np.array(ref), rtol=1e-5, atol=1e-5)

    mx.random.seed(2)
    for p in EXPERT_TARGETS:
        experts[p].lora_b = 0.05 * mx.random.normal(experts[p].lora_b.shape)
    _randomize_b(model)
    adapted_long, adapted_one = model(ids), model(ids[:, :1])
    assert np.abs(np.array(adapted_long) - np.array(ref)).max() > 1e-2  # the adapter acts
    if bits:  # re-quantized fuse keeps packed experts with the base's settings
        requantized = fuse_model(_copy_adapters(model, _moe_model(tiny_moe, bits)))
        q = requantized.layers[1].mlp.experts.down_proj
        assert isinstance(q, QuantizedSwitchLinear) and q.bits == bits
    fuse_model(model, dequantize=True)
    assert all(type(model.layers[1].mlp.experts[p]) is SwitchLinear for p in EXPERT_TARGETS)
    for adapted, x in ((adapted_long, ids), (adapted_one, ids[:, :1])):
        diff = np.abs(np.array(model(x)) - np.array(adapted)).max()
        print(f"bits={bits} L={x.shape[1]}: max |fused - unfused| = {diff:.2e}")
        assert diff < 1e-4


def _copy_adapters(src, dst):
    apply_lora(dst, **{k: v for k, v in src.adapter_config.items() if k != "dropout"})
    dst.load_weights(list(adapter_weights(src).items()), strict=False)
    return dst


def test_lora_on_stacked_experts_trains(tiny_moe):
    """Gradients reach every expert adapter that tokens were routed to, through gather_mm."""
    from mlxllm.lora.train import masked_loss

    model = _moe_model(tiny_moe)
    apply_lora(model, rank=4, targets=EXPERT_TARGETS)
    mx.random.seed(3)
    for p in EXPERT_TARGETS:
        m = model.layers[1].mlp.experts[p]
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    ids = mx.array([list(range(5, 45))])
    (loss, _), grads = nn.value_and_grad(model, masked_loss)(
        model, ids[:, :-1], ids[:, 1:], mx.ones(ids[:, 1:].shape)
    )
    g = dict(tree_flatten(grads))
    for p in EXPERT_TARGETS:
        for w in ("lora_a", "lora_b"):
            key = f"model.layers.1.mlp.experts.{p}.{w}"
            assert mx.abs(g[key]).sum().item() > 0, key


def test_dora_on_stacked_experts_is_a_clear_error(tiny_moe):
    model = _moe_model(tiny_moe)
    with pytest.raises(MlxllmError, match="DoRA is not supported on stacked experts"):
        apply_lora(model, rank=4, targets=EXPERT_TARGETS, dora=True)
