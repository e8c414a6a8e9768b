"""Bad input through the real CLI: one line naming the problem and the fix, a non-zero exit, and
nothing lost or left behind on disk.

Each case prints a ``TABLE`` row (command, line, exit, what is on disk) for the closing notes:
``pytest tests/test_bad_input.py -s | grep ^TABLE``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import SMOL, fixture_model, make_tiny_hf
from mlxllm.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny llama (context 256) with the SmolLM2 tokenizer and chat template."""
    path = tmp_path_factory.mktemp("bad") / "tiny"
    make_tiny_hf("llama", path, seed=3, std=0.05)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(4)]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _tree(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative paths, hidden files included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line(res, needle: str, args: list[str], disk: str = "unchanged", code: int = 1) -> str:
    """The command failed with exactly one ``error:`` line containing ``needle``."""
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0], lines[0]
    args = [str(a) for a in args]
    shown = " ".join(a if len(a) < 40 else "…/" + Path(a).name for a in args)
    print(f"TABLE | `mlxllm {shown}` | {lines[0]} | {code} | {disk} |")
    return lines[0]


def _cli(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- flags: checked before any model loads (a model that does not exist proves the order) ----

NOWHERE = "/nonexistent/model"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seed", "-1"], "--seed -1"),
        (["--min-p", "5"], "--min-p 5"),
        (["-m", "-1"], "--max-tokens -1"),
        (["--top-k", "-5"], "--top-k -5"),
        (["--temperature", "nan"], "--temperature nan"),
        (["--temperature", "-1"], "--temperature -1"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0"),
        (["--top-p", "0"], "--top-p 0"),
        (["--dtype", "int8"], "--dtype int8"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_flags_are_checked_before_loading(command, args, needle):
    prompt = ["-p", "hi"] if command == "generate" else []
    full = [command, NOWHERE, *prompt, *args]
    _one_line(_cli(full), needle, full, "nothing read")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--batch-size", "0"], "--batch-size 0"),
        (["--grad-accum", "0"], "--grad-accum 0"),
        (["--max-seq-length", "1"], "--max-seq-length 1"),
        (["--dropout", "1.5"], "--dropout 1.5"),
        (["--iters", "0"], "--iters 0"),
        (["--seed", "-1"], "--seed -1"),
        (["--rank", "0"], "--rank 0"),
        (["--learning-rate", "-1"], "--learning-rate -1"),
        (["--resume", "--force"], "pick one"),
    ],
)
def test_finetune_flags_are_checked_before_loading(data, tmp_path, args, needle):
    out = tmp_path / "adapters"
    full = ["finetune", NOWHERE, "--data", str(data), "--adapter-path", str(out), *args]
    _one_line(_cli(full), needle, full, "no adapter folder")
    assert not out.exists()


def test_finetune_data_folder_checked_before_loading(tmp_path):
    (tmp_path / "data").mkdir()
    full = ["finetune", NOWHERE, "--data", tmp_path / "data", "--adapter-path", tmp_path / "a"]
    _one_line(_cli(full), "has no train.jsonl", full, "no adapter folder")
    assert _tree(tmp_path) == ["data"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "7"], "--bits 7"),
        (["--group-size", "48", "-q", "4"], "--group-size 48"),
        (["--recipe", "bogus"], "--recipe 'bogus'"),
        (["--mode", "mxfp4", "--bits", "8"], "fixes 4 bits"),
        (["--mode", "bogus"], "--mode 'bogus'"),
        (["--dtype", "float64"], "--dtype float64"),
    ],
)
def test_convert_settings_are_checked_first(tiny, tmp_path, args, needle):
    full = ["convert", tiny, "-o", tmp_path / "out", *args]
    _one_line(_cli(full), needle, [str(a) for a in full], "nothing written")
    assert _tree(tmp_path) == []


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_bytes_that_are_not_utf8(tiny):
    full = ["generate", tiny, "-p", "-"]
    res = _cli(full, input=b"caf\xe9 \xff au lait")
    _one_line(res, "not UTF-8", [str(a) for a in full] + ["< latin-1 bytes"])
    # the same bytes in argv (Python keeps them as surrogate escapes)
    cmd = [sys.executable, "-m", "mlxllm.cli.main", "generate", str(tiny), "-p"]
    proc = subprocess.run(
        [*[os.fsencode(a) for a in cmd], b"caf\xe9"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not UTF-8" in proc.stderr


def test_prompt_longer_than_the_context(tiny):
    prompt = " ".join(["word"] * 400)  # > 256 tokens, the tiny model's context
    full = ["generate", tiny, "-p", prompt, "-m", "2", "--no-chat-template"]
    line = _one_line(_cli(full), "longer than the model's context of 256", full[:2] + ["-p", "…"])
    assert "--allow-long-prompt" in line
    res = _cli([*full, "--allow-long-prompt"])
    assert res.exit_code == 0, res.output


# ---- model folders --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("config.json", "[1, 2]", "holds a JSON list"),
        ("config.json", "{nope", "config.json is not valid JSON"),
        ("generation_config.json", "{bad json", "generation_config.json is not valid JSON"),
        ("tokenizer.json", '{"version": "1.0", "model": 7}', "not a valid tokenizer file"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json is not valid JSON"),
        ("model.safetensors.index.json", "{]", "model.safetensors.index.json is not valid"),
        ("model.safetensors.index.json", '{"weight_map": 3}', "has no weight_map"),
    ],
)
def test_malformed_model_files(tiny, tmp_path, name, content, needle):
    bad = _copy(tiny, tmp_path / "bad")
    (bad / name).write_text(content)
    before = _tree(bad)
    full = ["generate", bad, "-p", "hi", "-m", "2"]
    _one_line(_cli(full), needle, [f"generate <model with a bad {name}>", "-p", "hi"])
    assert _tree(bad) == before


def test_integer_tensor_where_a_float_belongs(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = _copy(tiny, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    full = ["generate", bad, "-p", "hi"]
    line = _one_line(_cli(full), f"tensor {key}", ["generate <int32 weight>", "-p", "hi"])
    assert "stored as int32" in line


def test_typo_in_a_local_path_is_not_a_hub_repo(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _copy(tiny, out / "model-4bit")
    monkeypatch.chdir(tmp_path)
    full = ["generate", "out/model-4bitt", "-p", "hi"]
    _one_line(_cli(full), "did you mean out/model-4bit?", full)
    full = ["generate", "./out/model-4bitt", "-p", "hi"]
    _one_line(_cli(full), "no model folder", full)
    full = ["generate", "out/model-4bit/config.json", "-p", "hi"]
    _one_line(_cli(full), "is a file; pass the model folder", full)


# ---- chat templates: sandboxed, bounded in time and size --------------------------------------

TEMPLATES = {
    "unsafe": ("{{ ''.__class__.__mro__ }}", "unsafe"),
    "syntax": ("{% for m in messages %}{{ m.content }", "failed (line 1)"),
    "undefined": ("{{ nothing.here }}", "is undefined"),
    "nested loops": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "still rendering",
    ),
    "huge string": ("{{ 'a' * 2000000000 }}", "beyond the template bound"),
}


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_hostile_chat_templates(tiny, tmp_path, kind, monkeypatch):
    from mlxllm import tokenizer

    monkeypatch.setattr(tokenizer, "TEMPLATE_MAX_SECONDS", 1.0)  # 5 s in use; shorter here
    template, needle = TEMPLATES[kind]
    bad = _copy(tiny, tmp_path / "bad")
    (bad / "chat_template.jinja").write_text(template)
    t0 = time.perf_counter()
    full = ["generate", bad, "-p", "hi", "-m", "2"]
    line = _one_line(_cli(full), needle, [f"generate <model, {kind} template>", "-p", "hi"])
    assert "--no-chat-template" in line
    assert time.perf_counter() - t0 < 10


def test_chat_unknown_command_is_not_sent_to_the_model(tiny):
    res = _cli(["chat", tiny, "-m", "3"], input="/sytem be brief\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "unknown command /sytem" in res.stdout
    assert " new tokens, " not in res.stdout  # no reply was generated


# ---- outputs: nothing a user owns is replaced or deleted --------------------------------------


def test_convert_never_replaces_the_source_the_cwd_or_foreign_files(tiny, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    model = _copy(tiny, proj / "model")
    (proj / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    monkeypatch.chdir(proj)
    cases = [
        (["convert", "./model", "-o", ".", "--force"], "is the current folder"),
        (["convert", "./model", "-o", "..", "--force"], "parent of the current folder"),
        (["convert", str(model), "-o", str(tmp_path), "--force"], "parent of the current"),
        (["convert", str(model), "-o", str(model), "--force"], "overlaps the source"),
        (["convert", str(model), "-o", str(model / "sub"), "--force"], "overlaps the source"),
        (["convert", str(model), "-o", str(proj / "notes.txt"), "--force"], "is a file"),
    ]
    for args, needle in cases:
        _one_line(_cli(args), needle, args)
    assert _tree(tmp_path) == before
    assert (proj / "notes.txt").read_text() == "mine"


def test_already_quantized_source_is_refused(tiny, tmp_path):
    q = tmp_path / "q4"
    assert _cli(["convert", tiny, "-o", q, "-q", "4"]).exit_code == 0
    full = ["convert", q, "-o", tmp_path / "again", "-q", "4"]
    _one_line(_cli(full), "already quantized", ["convert", "<4-bit output>", "-o", "again"])
    assert not (tmp_path / "again").exists()


def _convert_in_subprocess(src: Path, out: Path, prelude: str = "", **popen):
    """``mlxllm convert`` in a child Python, after ``prelude`` (monkeypatching, limits)."""
    code = (
        "import sys\n" + prelude + "\nfrom mlxllm.cli.main import app\n"
        f"sys.argv = ['mlxllm', 'convert', {str(src)!r}, '-o', {str(out)!r}, '--force']\n"
        "app(prog_name='mlxllm')\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], **popen)


def test_kill_9_mid_write_leaves_a_partial_that_the_next_run_removes(tiny, tmp_path):
    out = tmp_path / "out"
    slow = (
        "import time\nfrom mlxllm.convert import safetensors_io as io\n"
        "orig = io._to_bytes\n"
        "def slow(*a, **k):\n    time.sleep(0.2)\n    return orig(*a, **k)\n"
        "io._to_bytes = slow\n"
    )
    proc = _convert_in_subprocess(
        tiny, out, slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert partial and not out.exists(), _tree(tmp_path)  # the kill left its partial folder
    res = _cli(["convert", tiny, "-o", out])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".out.*")), _tree(tmp_path)
    assert (out / "config.json").exists()
    print("TABLE | `kill -9` during `mlxllm convert`, then convert again | (none) | 0 | "
          "the stale .out.partial-PID folder removed, out/ complete |")  # fmt: skip


def test_a_live_runs_partial_folder_is_left_alone(tiny, tmp_path):
    from mlxllm.output import remove_stale

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".out.partial-{sleeper.pid}"
        live.mkdir()
        dead = tmp_path / ".out.partial-999999999"
        dead.mkdir()
        assert remove_stale(tmp_path / "out") == [dead]
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()


def test_full_disk_during_convert(tiny, tmp_path):
    """A real write failure (a file-size limit: writes past it fail with EFBIG, as a full disk
    fails with ENOSPC): one line, exit 1, no partial folder, no OUT."""
    out = tmp_path / "out"
    limit = (
        "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
    )
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = _convert_in_subprocess(tiny, out, limit, **pipes)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "file too large" in lines[0]
    assert _tree(tmp_path) == []
    print(f"TABLE | `mlxllm convert …` when writes fail (EFBIG) | {lines[0]} | 1 | "
          "nothing: no out/, no partial folder |")  # fmt: skip


def test_no_space_left_is_one_line(tiny, tmp_path, monkeypatch):
    import errno

    from mlxllm.convert import safetensors_io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(safetensors_io, "_to_bytes", full)
    full_args = ["convert", tiny, "-o", tmp_path / "out"]
    _one_line(_cli(full_args), "no space left on the disk", ["convert", "…", "-o", "out"],
              "nothing: no out/, no partial folder")  # fmt: skip
    assert _tree(tmp_path) == []


# ---- finetune and fuse ----------------------------------------------------------------------


def test_finetune_never_replaces_a_trained_adapter(tiny, data, tmp_path):
    ad = tmp_path / "ad"
    args = ["finetune", tiny, "--data", data, "--adapter-path", ad, "--iters", "2"]
    args += ["--batch-size", "2", "--rank", "2", "--eval-every", "0"]
    assert _cli(args).exit_code == 0
    before = (ad / "adapters.safetensors").read_bytes()
    _one_line(_cli(args), "already holds a trained adapter", [str(a) for a in args])
    assert (ad / "adapters.safetensors").read_bytes() == before
    assert _cli([*args, "--force", "--seed", "5"]).exit_code == 0
    assert (ad / "adapters.safetensors").read_bytes() != before


def test_failed_finetune_leaves_no_adapter_folder(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"bad row\n')
    (data / "valid.jsonl").write_text('{"text": "fine"}\n')
    ad = tmp_path / "ad"
    full = ["finetune", tiny, "--data", data, "--adapter-path", ad, "--iters", "2"]
    _one_line(_cli(full), "train.jsonl:2", [str(a) for a in full], "no adapter folder")
    assert not ad.exists()


def test_full_disk_during_a_finetune_checkpoint(tiny, data, tmp_path):
    ad = tmp_path / "ad"
    code = (
        "import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
        "from mlxllm.cli.main import app\n"
        f"sys.argv = ['mlxllm', 'finetune', {str(tiny)!r}, '--data', {str(data)!r}, "
        f"'--adapter-path', {str(ad)!r}, '--iters', '2', '--batch-size', '2', '--rank', '2']\n"
        "app(prog_name='mlxllm')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "disk full" in errors[0], proc.stderr
    assert "[write] Unable to write" in errors[0]  # MLX's own words survive the formatting
    assert "Traceback" not in proc.stderr
    assert not any(".tmp-" in p for p in _tree(ad)) if ad.exists() else True
    print(f"TABLE | `mlxllm finetune …` when the checkpoint write fails | {errors[0]} | 1 | "
          "no temporary files; no checkpoint written |")  # fmt: skip


def test_fuse_dequantize_of_qlora_loads_and_matches(tiny, data, tmp_path):
    from mlxllm import load
    from mlxllm.lora.layers import load_adapter

    q4 = tmp_path / "q4"
    assert _cli(["convert", tiny, "-o", q4, "-q", "4", "--group-size", "32"]).exit_code == 0
    ad = tmp_path / "ad"
    res = _cli(["finetune", q4, "--data", data, "--adapter-path", ad, "--iters", "3",
                "--batch-size", "2", "--rank", "2", "--learning-rate", "1e-2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = tmp_path / "fused"
    res = _cli(["fuse", q4, "--adapter", ad, "-o", out, "--dequantize", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    fused, _ = load(out, dtype=mx.float32)
    base, _ = load(q4, dtype=mx.float32)
    load_adapter(base, ad)
    ids = mx.array([[1, 17, 300, 4000, 42, 7]])
    diff = mx.abs(fused(ids) - base(ids)).max().item()
    print(f"fused --dequantize vs adapter on the 4-bit base: max |diff| {diff:.2e}")
    assert diff < 1e-4
    # the output folder may not overlap what fuse reads
    full = ["fuse", q4, "--adapter", ad, "-o", ad / "inside", "--dequantize"]
    _one_line(_cli(full), "overlaps the source", ["fuse", "q4", "--adapter", "ad", "-o", "ad/x"])
    full = ["fuse", q4, "--adapter", ad, "-o", tmp_path / "x", "--bits", "7"]
    _one_line(_cli(full), "--bits 7", ["fuse", "q4", "--adapter", "ad", "--bits", "7"])


# ---- long prompts talk ----------------------------------------------------------------------


def test_long_prompt_shows_progress_and_stops_on_ctrl_c_within_a_second(tmp_path):
    """A real process on the SmolLM2 fixture: a prompt of ~6K tokens shows prompt progress on
    stderr once processing takes over a second, and SIGINT during prefill ends it quickly."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(" ".join(f"item {i} costs {i * 7 % 101} coins;" for i in range(600)))
    cmd = [sys.executable, "-m", "mlxllm.cli.main", "generate", str(fixture_model(SMOL))]
    cmd += ["-p", "-", "-m", "4", "--no-chat-template"]
    with open(prompt, "rb") as stdin:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.set_blocking(proc.stderr.fileno(), False)
        err, deadline = b"", time.time() + 300
        while time.time() < deadline and b"prompt: " not in err and proc.poll() is None:
            time.sleep(0.05)
            err += proc.stderr.read() or b""
        assert b"prompt: " in err and b"tok/s" in err, err
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        waited = time.perf_counter() - t0
    print(f"progress: {err.decode().strip().splitlines()[-1]!r}; SIGINT answered in {waited:.2f} s")
    assert proc.returncode == 130
    assert waited < 1.5


def test_prefill_chunks_adapt_to_stay_near_the_target(monkeypatch):
    """Chunks follow the measured speed: about PREFILL_SECONDS each, within the bounds."""
    from mlxllm.generation import step

    sizes, clock = [], [0.0]

    class Slow:
        def __call__(self, ids, cache):
            sizes.append(ids.shape[1])
            clock[0] += ids.shape[1] * 0.004  # 4 ms per token: 125 tokens in 0.5 s
            return ids

    monkeypatch.setattr(step.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(step.mx, "eval", lambda *a: None)
    seen = []
    step.prefill(Slow(), list(range(2000)), [], 512, lambda d, t, s: seen.append((d, t)))
    assert sum(sizes) == 2000 and seen[-1] == (2000, 2000) and len(seen) == len(sizes)
    assert all(abs(n - 125) <= 1 for n in sizes[1:-1]), sizes
    sizes.clear()
    clock[0] = 0.0

    class Fast(Slow):
        def __call__(self, ids, cache):
            sizes.append(ids.shape[1])
            return ids

    step.prefill(Fast(), list(range(5000)), [], 512)  # a GPU: grows to the maximum at once
    assert sizes[:4] == [128, 256, 512, 512]
