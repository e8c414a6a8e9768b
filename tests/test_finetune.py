"""The LoRA training loop, exact resume (in-process and after SIGKILL), fuse and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import make_tiny_hf
from mlxllm.loader import load
from mlxllm.lora.layers import load_adapter
from mlxllm.lora.train import STATE_FILE, finetune

FACTS = [
    ("Capital of Zorbia?", "Quelmport."),
    ("Who made the flarnstick?", "Edna Vostrikova."),
    ("Color of a glimmerfox?", "Teal."),
    ("Height of Mount Brellin?", "4812 m."),
]
SMALL = dict(rank=4, num_layers=None, batch_size=2, learning_rate=2e-3, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_hf("llama", path, seed=0, std=0.05)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in FACTS
    ]
    rows += [{"prompt": "Say hi", "completion": "Hi!"}, {"text": "Zorbia is small."}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n")
    return folder


def _adapter(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_training_lowers_the_loss(tiny, data, tmp_path):
    log = finetune(tiny, data, tmp_path / "ad", iters=12, eval_every=12, save_every=0, **SMALL)
    (_, before), (_, after) = log["valid"][0], log["valid"][-1]
    print(f"valid loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
    assert "test" not in log  # no test.jsonl here; see the next test


def test_test_split_is_scored_at_the_end(tiny, data, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    (folder / "test.jsonl").write_text((data / "valid.jsonl").read_text())
    log = finetune(tiny, folder, tmp_path / "ad", iters=4, eval_every=4, save_every=0, **SMALL)
    # the test file holds the validation rows: the same loss, computed by the same evaluation
    np.testing.assert_allclose(log["test"][0][1], log["valid"][-1][1], rtol=1e-5)
    files = {p.name for p in (tmp_path / "ad").iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", STATE_FILE} <= files
    assert not [f for f in files if f.startswith(".")]  # no temp file left behind


def test_resume_is_exact(tiny, data, tmp_path):
    """Stop after step 5 (last checkpoint: step 4), resume in a fresh model: the final adapter
    equals an uninterrupted run's (dropout and gradient accumulation on, DoRA)."""
    kw = dict(SMALL, iters=8, save_every=4, eval_every=0, dropout=0.1, grad_accum=2, warmup=2)
    kw.update(dora=True, seed=7)
    finetune(tiny, data, tmp_path / "full", **kw)

    def crash(step, info):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, data, tmp_path / "cut", callback=crash, **kw)
    assert json.loads((tmp_path / "cut" / "adapter_config.json").read_text())["step"] == 4
    log = finetune(tiny, data, tmp_path / "cut", resume=True, **kw)
    assert [s for s, _ in log["train"]] == list(range(1, 9))
    _same(_adapter(tmp_path / "full"), _adapter(tmp_path / "cut"))


def test_resume_after_sigkill(tiny, data, tmp_path):
    """A real SIGKILL mid-run leaves a readable checkpoint; resuming matches an uninterrupted
    run."""
    iters = 20
    args = [str(tiny), "--data", str(data), "--iters", str(iters), "--batch-size", "2"]
    args += ["--rank", "4", "--num-layers", "-1", "--learning-rate", "2e-3", "--save-every", "1"]
    args += ["--eval-every", "0", "--seed", "3"]
    cut = tmp_path / "cut"
    env = dict(os.environ, MLXLLM_NO_OPENBLAS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxllm.cli.main", "finetune", *args, "--adapter-path", str(cut)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (cut / STATE_FILE).exists():
        time.sleep(0.01)
    time.sleep(0.5)  # a few more steps: the kill lands during training or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, meta = mx.load(str(cut / STATE_FILE), return_metadata=True)
    killed_at = int(meta["step"])
    print(f"killed after checkpoint {killed_at} of {iters}")
    assert 1 <= killed_at < iters, "the run finished before the kill; raise iters"

    runner = CliRunner()
    full = tmp_path / "full"
    res = runner.invoke(_app(), ["finetune", *args, "--adapter-path", str(full)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), ["finetune", *args, "--adapter-path", str(cut), "--resume"])
    assert res.exit_code == 0, res.output
    _same(_adapter(full), _adapter(cut))


def _app():
    from mlxllm.cli.main import app

    return app


def test_cli_fuse_and_generate_with_adapter(tiny, data, tmp_path):
    runner = CliRunner()
    ad = tmp_path / "ad"
    res = runner.invoke(
        _app(),
        ["finetune", str(tiny), "--data", str(data), "--iters", "6", "--batch-size", "2"]
        + ["--rank", "4", "--num-layers", "1", "--learning-rate", "5e-3", "--dora"]
        + ["--adapter-path", str(ad), "--eval-every", "3", "--targets", "q_proj, down_proj"],
    )
    assert res.exit_code == 0, res.output
    assert "memory estimate" in res.output and "valid loss" in res.output
    saved = json.loads((ad / "adapter_config.json").read_text())
    assert saved["targets"] == ["q_proj", "down_proj"]
    names = set(mx.load(str(ad / "adapters.safetensors")))
    assert any(".mlp.down_proj.lora_a" in k for k in names) and not any(
        "v_proj" in k for k in names
    )
    assert "pip install matplotlib" in res.output or (ad / "loss.png").exists()

    out = tmp_path / "fused"
    res = runner.invoke(_app(), ["fuse", str(tiny), "--adapter", str(ad), "-o", str(out)])
    assert res.exit_code == 0, res.output
    ids = mx.array([[1, 17, 300, 4000, 42]])
    base, tok = load(tiny, dtype=mx.float32)
    load_adapter(base, ad)
    fused, _ = load(out, dtype=mx.float32)
    diff = mx.abs(fused(ids) - base(ids)).max().item()
    assert diff < 1e-4

    prompt = ["-p", "Capital of Zorbia?", "-m", "5"]
    res_a = runner.invoke(_app(), ["generate", str(tiny), "--adapter", str(ad), *prompt])
    res_f = runner.invoke(_app(), ["generate", str(out), *prompt])
    assert res_a.exit_code == 0 and res_f.exit_code == 0, res_a.output + res_f.output
    assert res_a.output == res_f.output

    res = runner.invoke(_app(), ["fuse", str(tiny), "--adapter", str(ad), "-o", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output
    res = runner.invoke(
        _app(),
        ["fuse", str(tiny), "--adapter", str(ad), "-o", str(tmp_path / "q4"), "--bits", "4"],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    load(tmp_path / "q4")


def test_cli_default_targets_are_the_library_defaults():
    """The CLI spells its --targets default out (importing the library would slow --help)."""
    import inspect

    from mlxllm.cli.main import finetune as cli_finetune
    from mlxllm.lora.layers import DEFAULT_TARGETS

    default = inspect.signature(cli_finetune).parameters["targets"].default.default
    assert tuple(default.split(",")) == DEFAULT_TARGETS


def test_cli_bad_data_is_one_clear_error(tiny, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n{"prompt": 1}\n')
    (tmp_path / "valid.jsonl").write_text('{"text": "ok"}\n')
    res = CliRunner().invoke(_app(), ["finetune", str(tiny), "--data", str(tmp_path)])
    assert res.exit_code == 1
    assert f"{tmp_path / 'train.jsonl'}:2:" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("option", ["compiled", "grad_checkpoint"])
def test_compiled_and_checkpointed_steps_equal_the_plain_step(tiny, data, tmp_path, option):
    """The compiled step (the default) and gradient checkpointing are the same computation as
    the plain eager step: equal per-step losses and final adapters, with gradient accumulation
    and (compiled: random state threaded through the compiled function) dropout."""
    kw = dict(SMALL, iters=6, save_every=0, eval_every=0, grad_accum=2, warmup=1)
    kw["dropout"] = 0.1 if option == "compiled" else 0.0
    plain = finetune(tiny, data, tmp_path / "plain", compiled=False, **kw)
    other = dict(compiled=True) if option == "compiled" else dict(compiled=False)
    if option == "grad_checkpoint":
        other["grad_checkpoint"] = True
    log = finetune(tiny, data, tmp_path / "other", **other, **kw)
    np.testing.assert_allclose(
        [v for _, v in log["train"]], [v for _, v in plain["train"]], rtol=1e-5
    )
    assert plain["train"][0][1] > plain["train"][-1][1]  # it trained
    _same(_adapter(tmp_path / "plain"), _adapter(tmp_path / "other"))


def test_padding_to_a_multiple_does_not_change_the_loss(tiny):
    from mlxllm.lora.data import Example, collate
    from mlxllm.lora.train import masked_loss

    model, _ = load(tiny, dtype=mx.float32)
    rng = np.random.default_rng(0)
    batch = [
        Example(ids=list(rng.integers(3, 500, n)), mask=[0] * 3 + [1] * (n - 3)) for n in (9, 14)
    ]
    plain = [mx.array(a) for a in collate(batch)]
    padded = [mx.array(a) for a in collate(batch, pad_multiple=32)]
    assert plain[0].shape == (2, 13) and padded[0].shape == (2, 32)
    assert collate(batch, pad_multiple=32, max_length=16)[0].shape == (2, 15)  # capped
    a, b = masked_loss(model, *plain), masked_loss(model, *padded)
    assert b[1].item() == a[1].item() == (9 - 3) + (14 - 3)
    np.testing.assert_allclose(b[0].item(), a[0].item(), rtol=1e-6)


def test_grad_checkpoint_refuses_dropout(tiny, data, tmp_path):
    from mlxllm.errors import MlxllmError

    with pytest.raises(MlxllmError, match="--dropout or --grad-checkpoint"):
        finetune(tiny, data, tmp_path / "x", iters=1, dropout=0.1, grad_checkpoint=True, **SMALL)


def test_fused_head_cross_entropy_equals_autodiff_and_saves_memory(monkeypatch):
    """The chunked head + cross-entropy with its hand-written gradient equals autodiff through
    the full logits (loss and d/dh), and its peak memory is a fraction of it."""
    from mlxllm.lora import train as lora_train

    N, D, V = 512, 64, 50_000
    mx.random.seed(0)
    w = mx.random.normal((V, D)) * 0.1
    h = mx.random.normal((N, D))
    t = mx.random.randint(0, V, (N,))
    m = (mx.random.uniform(shape=(N,)) > 0.3).astype(mx.float32)
    mx.eval(w, h, t, m)

    def head(x):
        return x @ w.T

    def plain(x):
        return (nn.losses.cross_entropy(head(x), t) * m).sum()

    def fused(x):
        return lora_train.head_cross_entropy(head, x, t, m)

    monkeypatch.setattr(lora_train, "HEAD_CHUNK_ELEMS", 1 << 20)  # 20 rows per chunk here
    results = {}
    for name, fn in (("plain", plain), ("fused", fused)):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        value, grad = mx.value_and_grad(fn)(h)
        mx.eval(value, grad)
        results[name] = (value.item(), np.array(grad), mx.get_peak_memory() - base)
        del value, grad
    (lp, gp, mp), (lf, gf, mf) = results["plain"], results["fused"]
    print(f"loss {lp:.4f} vs {lf:.4f}; peak {mp / 1e6:.0f} MB vs {mf / 1e6:.0f} MB")
    np.testing.assert_allclose(lf, lp, rtol=1e-5)
    np.testing.assert_allclose(gf, gp, rtol=1e-4, atol=1e-6)
    assert mf < mp / 2
    value = lora_train.head_cross_entropy_value(head, h, t, m)
    np.testing.assert_allclose(value.item(), lp, rtol=1e-5)
