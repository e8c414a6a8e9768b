"""The CLI on a tiny saved model: generate, chat, errors; and --help stays light."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from helpers import make_tiny_hf
from mlxllm import load
from mlxllm.cli.chat import ChatSession, ThinkFilter
from mlxllm.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    make_tiny_hf("llama", path, seed=4)
    return path


def _one_error_line(res):
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_help_imports_neither_mlx_nor_transformers():
    code = (
        "import sys\n"
        "from mlxllm.cli.main import app\n"
        "try:\n    app(['--help'], prog_name='mlxllm')\nexcept SystemExit:\n    pass\n"
        "heavy = ('mlx', 'mlx.core', 'transformers', 'torch', 'numpy')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout and "chat" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout


def test_generate_prompt_and_stdin(tiny_path):
    res = runner.invoke(app, ["generate", str(tiny_path), "-p", "Hello", "-m", "5", "-v"])
    assert res.exit_code == 0, res.output
    assert "tok/s" in res.stderr and "peak memory" in res.stderr
    res2 = runner.invoke(app, ["generate", str(tiny_path), "-p", "-", "-m", "5"], input="Hello")
    assert res2.exit_code == 0, res2.output
    assert res2.stdout == res.stdout  # same prompt, greedy
    raw = runner.invoke(
        app, ["generate", str(tiny_path), "-p", "Hello", "-m", "5", "--no-chat-template"]
    )
    assert raw.exit_code == 0


def test_errors_are_one_clear_line(tiny_path, tmp_path):
    assert "unknown model" in _one_error_line(
        runner.invoke(app, ["generate", "nope-7b", "-p", "x"])
    )
    bad = tmp_path / "bad"
    shutil.copytree(tiny_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    line = _one_error_line(runner.invoke(app, ["generate", str(bad), "-p", "x"]))
    assert "gpt_neox" in line and "qwen2" in line and "llama" in line
    (bad / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "model_type"})
    )
    assert "model_type" in _one_error_line(runner.invoke(app, ["generate", str(bad), "-p", "x"]))
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").unlink()
    assert "safetensors" in _one_error_line(runner.invoke(app, ["generate", str(bad), "-p", "x"]))
    (bad / "config.json").unlink()
    assert "config.json" in _one_error_line(runner.invoke(app, ["generate", str(bad), "-p", "x"]))
    # a truncated weight file
    shutil.copytree(tiny_path, tmp_path / "trunc")
    w = tmp_path / "trunc" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "truncated" in _one_error_line(
        runner.invoke(app, ["generate", str(w.parent), "-p", "x"])
    )


def test_chat_repl_commands(tiny_path):
    script = 'Hello there\n/system Be brief.\nHi\n"""\nline one\nline two\n"""\n/reset\n/exit\n'
    res = runner.invoke(app, ["chat", str(tiny_path), "-m", "4"], input=script)
    assert res.exit_code == 0, res.output
    assert res.stdout.count(" new tokens, ") == 3  # one stats line per reply
    assert "system prompt set" in res.stdout and "conversation cleared" in res.stdout


def test_chat_keeps_cache_and_survives_ctrl_c(tiny_path):
    model, tok = load(tiny_path, dtype=mx.float32)
    session = ChatSession(model, tok, max_tokens=6)
    first = session.reply("Tell me something.")
    second = session.reply("And more?")
    full = tok.encode(tok.apply_chat_template(session.messages[:-1]), add_special_tokens=False)
    assert second.prompt_tokens < len(full) // 2  # the history was not re-prefilled
    assert first is not None

    calls = {"n": 0}
    real_call = type(model).__call__

    class Interrupting(type(model)):
        def __call__(self, ids, cache=None):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return real_call(self, ids, cache)

    model.__class__ = Interrupting
    try:
        session.reply("Third question")  # interrupted mid-reply: caught, session kept
    finally:
        model.__class__ = Interrupting.__mro__[1]
    assert session.messages[-1]["role"] == "assistant"
    assert session.cache.offset == len(session.cache.ids)
    after = session.reply("Still there?")
    assert after is not None and after.generation_tokens > 0


def test_think_filter_splits_across_chunks():
    f = ThinkFilter(thinking=True)
    pieces = []
    for part in ["let me ", "think</th", "ink>The answer", " is 4."]:
        pieces += f.feed(part)
    pieces += f.flush()
    thought = "".join(t for t, dim in pieces if dim and t != "</think>")
    answer = "".join(t for t, dim in pieces if not dim)
    assert thought == "let me think" and answer == "The answer is 4."
    g = ThinkFilter()
    out = g.feed("<think>hm</think>ok") + g.flush()
    assert [t for t, d in out if not d] == ["ok"]


def test_serve_options_are_checked_before_a_model_loads(tmp_path):
    res = runner.invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "--api-key" in res.stdout and "127.0.0.1" in res.stdout
    line = _one_error_line(runner.invoke(app, ["serve", str(tmp_path / "none"), "--port", "0"]))
    assert "--port 0" in line
    line = _one_error_line(runner.invoke(app, ["serve", str(tmp_path / "none"),
                                               "--gather-ms", "-1"]))  # fmt: skip
    assert "--gather-ms -1" in line
    line = _one_error_line(runner.invoke(app, ["serve", str(tmp_path / "none")]))
    assert "none" in line  # a missing model: one line, no traceback
