"""What the side-by-side benchmarks share: paths, the worker environment, running a worker, and
the report's medians, ratios and table rows.

Each benchmark runs every runtime in its own subprocess (``python BENCH.py --worker ...``) that
prints one ``RESULT {json}`` line; ``run_worker`` runs one and parses that line.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("MLXLLM_FIXTURES", "~/.cache/mlxllm-fixtures/models")).expanduser()
DEFAULT_MODEL = FIXTURES / "qwen2.5-coder-0.5b-instruct"
OPENBLAS_GLOBS = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",)


def bench_env() -> dict:
    """The workers' environment: this checkout importable, OpenBLAS preloaded on Linux when it
    is installed (MLX's CPU wheel bundles a much slower reference BLAS), offline Hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if sys.platform.startswith("linux") and "openblas" not in env.get("LD_PRELOAD", ""):
        libs = [p for g in OPENBLAS_GLOBS for p in glob.glob(g)]
        if libs:
            env["LD_PRELOAD"] = ":".join(filter(None, [libs[0], env.get("LD_PRELOAD")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_worker(script: str, args: list[str], env: dict, timeout: float) -> dict:
    """Run ``python script --worker ARGS``; its ``RESULT`` line as a dict (plus
    ``process_wall_s``), or ``{"error": ...}`` naming the exit status and the last lines."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", *args]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            r["process_wall_s"] = wall
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)}


def ratio(a, b):
    """``a / b``, or None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def median(xs):
    """The median of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def compare(a: list, b: list) -> dict:
    """Per-repeat values of mlxllm (``a``) and mlx-lm (``b``): medians, ratio, spread."""
    rs = [r for r in (ratio(x, y) for x, y in zip(a, b, strict=True)) if r is not None]
    return {
        "mlxllm": median(a),
        "mlx-lm": median(b),
        "ratio": median(rs),
        "spread": (min(rs), max(rs)) if rs else None,
        "per_repeat": {"mlxllm": a, "mlx-lm": b},
    }


def fmt(x, spec: str) -> str:
    """``x`` in format ``spec`` ("d": rounded to an integer), "-" for None."""
    if x is None:
        return "-"
    return format(round(x) if spec == "d" else x, spec)


def table_row(label, c, spec) -> str:
    """One markdown row of a ``compare`` result: label, both medians, ratio, spread."""
    sp = c["spread"]
    spread = f"{sp[0]:.2f}-{sp[1]:.2f}" if sp else "-"
    return (
        f"| {label} | {fmt(c['mlxllm'], spec)} | {fmt(c['mlx-lm'], spec)} | "
        f"{fmt(c['ratio'], '.2f')} | {spread} |"
    )
