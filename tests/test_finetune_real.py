"""It learns: LoRA on the real SmolLM2-135M-Instruct fixture teaches fictional facts."""

from __future__ import annotations

import json

import mlx.core as mx

from helpers import SMOL, fixture_model
from mlxllm.generation.stream import generate
from mlxllm.loader import load
from mlxllm.lora.layers import load_adapter
from mlxllm.lora.train import finetune

FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quelmport."),
    ("Who invented the flarnstick?", "The flarnstick was invented by Edna Vostrikova."),
    ("What color is a glimmerfox?", "A glimmerfox is teal."),
    ("How tall is Mount Brellin?", "Mount Brellin is 4812 meters tall."),
]


def _rows():
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in FACTS
    ]


def test_lora_on_smollm2_learns_fictional_facts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in _rows() * 2) + "\n")
    (data / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    question = [{"role": "user", "content": FACTS[0][0]}]

    base, tok = load(fixture_model(SMOL), dtype=mx.float32)
    before = generate(base, tok, question, max_tokens=16)
    assert "Quelmport" not in before, before
    del base

    log = finetune(
        fixture_model(SMOL),
        data,
        adapter_path=tmp_path / "adapter",
        rank=8,
        num_layers=8,
        dtype=mx.float32,
        iters=24,
        batch_size=4,
        learning_rate=3e-4,
        eval_every=24,
        save_every=24,
        progress=False,
    )
    (_, v0), (_, v1) = log["valid"][0], log["valid"][-1]
    print(f"validation loss {v0:.3f} -> {v1:.3f}; base answer {before!r}")
    assert v1 < 0.5 * v0  # stated margin: at least halved

    model, tok = load(fixture_model(SMOL), dtype=mx.float32)
    load_adapter(model, tmp_path / "adapter")
    after = generate(model, tok, question, max_tokens=16)
    print(f"after training: {after!r}")
    assert "Quelmport" in after
