"""Side-by-side speed benchmark: mlxllm against mlx-lm on the same model and token-id prompt.

Measures, in one run:

1. prompt (prefill) tok/s, decode tok/s and peak memory of each runtime, each in its own
   subprocess (so peak memory and warm caches never mix), greedy, with eos ignored:

   - ``mlxllm``             the default compute dtype (float32 on MLX's CPU backend)
   - ``mlx-lm-fp16``        mlx-lm as it loads the checkpoint (float16 as stored)
   - ``mlx-lm-fp32``        mlx-lm with the model cast to float32 (same math as mlxllm on CPU)
   - ``mlxllm-fp16``        optional (``--variants``): mlxllm forced to float16

2. cold start: wall time of the whole ``mlxllm generate MODEL -p Hello --max-tokens 1`` command
   against ``mlx_lm generate --model MODEL --prompt Hello --max-tokens 1`` (best of ``--runs``),
   and of ``mlxllm --help``.

3. a table with absolute figures and mlxllm / mlx-lm ratios, also written as JSON to
   ``benchmarks/results/decode.json``.

Timing is measured the same way for every runtime (not taken from each library's own counters,
which define tok/s differently): prompt time is from the call until the first token arrives;
decode tok/s is (tokens after the first) / (time from the first to the last token).

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/decode.py [--prompt-tokens 128] [--gen-tokens 32] [--skip-cold]

Environment: ``MLXLLM_FIXTURES`` (model folder root, default ``~/.cache/mlxllm-fixtures/models``),
``MLXLLM_EVAL_FIXTURES`` (folder of evaluation texts, default ``../shared/fixtures/eval`` next to
the repository). On Linux OpenBLAS is preloaded into every subprocess when it is installed and
``LD_PRELOAD`` does not name it already (MLX's CPU wheel bundles a much slower reference BLAS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, bench_env, ratio, run_worker

EVAL_DIR = Path(os.environ.get("MLXLLM_EVAL_FIXTURES", REPO.parent / "shared/fixtures/eval"))
PROMPT_FILE = "en-apache-2.0.txt"
RESULTS = REPO / "benchmarks" / "results" / "decode.json"

VARIANTS = {
    "mlxllm": "mlxllm (fp32 default on CPU)",
    "mlxllm-fp16": "mlxllm (forced fp16)",
    "mlx-lm-fp16": "mlx-lm (default, fp16 as stored)",
    "mlx-lm-fp32": "mlx-lm (cast to float32)",
}
DEFAULT_VARIANTS = "mlxllm,mlx-lm-fp16,mlx-lm-fp32"
WARMUP_PROMPT, WARMUP_GEN = 16, 4


# ---------------------------------------------------------------------------------------------
# worker: one runtime, one process; prints a JSON line on stdout


def _time_stream(chunks, count) -> dict:
    """Drain a generation stream, timing the first and the last token.

    ``count(chunk)`` is the number of tokens generated so far when ``chunk`` arrives.
    """
    t0 = time.perf_counter()
    t_first = t_last = None
    n_first = n_last = 0
    last = None
    for last in chunks:
        now = time.perf_counter()
        n = count(last)
        if t_first is None and n >= 1:
            t_first, n_first = now, n
        t_last, n_last = now, n
    if t_first is None:
        raise RuntimeError("no token was generated")
    decode_time = t_last - t_first
    decoded = n_last - n_first
    return {
        "prompt_time_s": t_first - t0,
        "decode_time_s": decode_time,
        "generation_tokens": n_last,
        "decode_tps": decoded / decode_time if decoded > 0 and decode_time > 0 else 0.0,
        "total_time_s": t_last - t0,
        "last": last,
    }


def _measure(stream, ids: list[int], gen: int, load_s: float, param_dtype: str) -> dict:
    """Warm up, then time ``stream(prompt_ids, max_tokens)`` (either library's
    ``stream_generate``, greedy) over ``ids``; the generated text is kept for comparison."""
    import mlx.core as mx

    def count(c):
        return c.generation_tokens

    _time_stream(stream(ids[:WARMUP_PROMPT], WARMUP_GEN), count)
    text: list[str] = []

    def collect():
        for c in stream(ids, gen):
            text.append(c.text)
            yield c

    mx.reset_peak_memory()
    r = _time_stream(collect(), count)
    last = r.pop("last")
    return dict(
        r,
        load_s=load_s,
        param_dtype=param_dtype,
        prompt_tokens=last.prompt_tokens,
        finish_reason=last.finish_reason,
        lib_prompt_tps=last.prompt_tps,
        lib_generation_tps=last.generation_tps,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        text="".join(text),
    )


def _run_mlxllm(model_path: str, ids: list[int], gen: int, dtype: str | None) -> dict:
    import mlx.core as mx

    from mlxllm import load, stream_generate

    t = time.perf_counter()
    model, tok = load(model_path, dtype=getattr(mx, dtype) if dtype else None)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    tok.eos_token_ids = set()  # ignore eos: always generate exactly `gen` tokens
    param_dtype = str(next(iter(v for _, v in _leaves(model.parameters()))).dtype)

    def stream(prompt, n):
        return stream_generate(model, tok, prompt, max_tokens=n, temperature=0.0)

    return _measure(stream, ids, gen, load_s, param_dtype)


def _run_mlx_lm(model_path: str, ids: list[int], gen: int, dtype: str | None) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    t = time.perf_counter()
    model, tok = load(model_path)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    tok.eos_token_ids = set()  # ignore eos: always generate exactly `gen` tokens
    param_dtype = str(next(iter(v for _, v in _leaves(model.parameters()))).dtype)

    def stream(prompt, n):
        return stream_generate(model, tok, prompt, max_tokens=n)  # greedy by default

    return _measure(stream, ids, gen, load_s, param_dtype)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def worker(variant: str, model: str, ids_file: str, gen: int) -> None:
    ids = json.loads(Path(ids_file).read_text())
    runners = {
        "mlxllm": lambda: _run_mlxllm(model, ids, gen, None),
        "mlxllm-fp16": lambda: _run_mlxllm(model, ids, gen, "float16"),
        "mlx-lm-fp16": lambda: _run_mlx_lm(model, ids, gen, None),
        "mlx-lm-fp32": lambda: _run_mlx_lm(model, ids, gen, "float32"),
    }
    r = runners[variant]()
    r["prompt_tps"] = r["prompt_tokens"] / r["prompt_time_s"] if r["prompt_time_s"] else 0.0
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r["max_rss_gb"] = rss / (1e9 if sys.platform == "darwin" else 1e6)
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------------------------------------
# driver


def build_prompt(model: Path, n: int) -> list[int]:
    """Exactly ``n`` token ids of the fixture text (repeated if it is too short)."""
    from tokenizers import Tokenizer

    text = (EVAL_DIR / PROMPT_FILE).read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise SystemExit(f"{EVAL_DIR / PROMPT_FILE} tokenizes to nothing")
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_variant(variant: str, model: Path, ids_file: str, gen: int, env: dict, timeout: float):
    args = [variant, "--model", str(model), "--ids-file", ids_file, "--gen-tokens", str(gen)]
    return run_worker(__file__, args, env, timeout)


def _script(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def cold_start(model: Path, runs: int, env: dict) -> dict:
    mlxllm = _script("mlxllm")
    mlx_lm = _script("mlx_lm")
    mlxllm_cmd = [mlxllm] if mlxllm else [sys.executable, "-m", "mlxllm.cli.main"]
    mlx_lm_cmd = [mlx_lm] if mlx_lm else [sys.executable, "-m", "mlx_lm"]
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mlxllm --help": mlxllm_cmd + ["--help"],
        "mlxllm generate": mlxllm_cmd
        + ["generate", str(model), "-p", "Hello", "--max-tokens", "1"],
        "mlx_lm generate": mlx_lm_cmd
        + ["generate", "--model", str(model), "--prompt", "Hello", "--max-tokens", "1"],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    errors: dict[str, str] = {}
    for _ in range(runs):  # interleaved, so drifting machine load hits every command alike
        for name, cmd in cmds.items():
            if name in errors:
                continue
            t = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t
            if p.returncode != 0:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                errors[name] = f"exit {p.returncode}: " + " | ".join(tail)
            else:
                times[name].append(dt)
    out = {}
    for name, cmd in cmds.items():
        out[name] = {
            "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "times_s": times[name],
            "best_s": min(times[name]) if times[name] else None,
        }
        if name in errors:
            out[name]["error"] = errors[name]
    return out


def _fmt(x, spec=".2f", unit=""):
    return "-" if x is None else f"{x:{spec}}{unit}"


def _prefix_match(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(res: dict) -> list[str]:
    lines = []
    cfg = res["config"]
    lines.append(
        f"model {Path(cfg['model']).name} | prompt {cfg['prompt_tokens']} token ids of "
        f"{PROMPT_FILE} | {cfg['gen_tokens']} new tokens, greedy, eos ignored"
    )
    lines.append(
        f"mlx {cfg['mlx']} | mlx-lm {cfg['mlx_lm']} | mlxllm {cfg['mlxllm']} | "
        f"{cfg['cpus']} CPUs | LD_PRELOAD={cfg['ld_preload'] or '-'}"
    )
    if cfg.get("note"):
        lines.append(cfg["note"])
    lines.append("")
    head = (
        f"{'runtime':<34} {'dtype':>8} {'prompt tok/s':>12} {'decode tok/s':>12} "
        f"{'gen':>4} {'peak MLX GB':>11} {'max RSS GB':>10} {'load s':>6}"
    )
    lines += [head, "-" * len(head)]
    runs = res["throughput"]
    for v, r in runs.items():
        if "error" in r:
            lines.append(f"{VARIANTS[v]:<34} ERROR {r['error']}")
            continue
        lines.append(
            f"{VARIANTS[v]:<34} {r['param_dtype'].replace('mlx.core.', ''):>8} "
            f"{r['prompt_tps']:>12.1f} {r['decode_tps']:>12.2f} {r['generation_tokens']:>4} "
            f"{r['peak_memory_gb']:>11.3f} {r['max_rss_gb']:>10.3f} {r['load_s']:>6.1f}"
        )
    ratios = res.get("ratios", {})
    if ratios:
        lines.append("")
        lines.append(
            f"{'mlxllm / mlx-lm':<34} {'prompt':>8} {'decode':>8} {'(>= 1.0)':>8} "
            f"{'peak MLX':>9} {'max RSS':>8}"
        )
        for k, r in ratios.items():
            ok = "" if r["decode"] is None else ("ok" if r["decode"] >= 1.0 else "BELOW")
            lines.append(
                f"  vs {k:<30} {_fmt(r['prompt'], '>8.2f')} {_fmt(r['decode'], '>8.2f')} "
                f"{ok:>8} {_fmt(r['peak_memory'], '>9.2f')} {_fmt(r['max_rss'], '>8.2f')}"
            )
    agree = res.get("agreement", {})
    if agree:
        lines.append("")
        for k, n in agree.items():
            lines.append(
                f"greedy output text identical to mlxllm's, {k}: first {n[0]} of {n[1]} chars"
            )
    cold = res.get("cold_start")
    if cold:
        lines.append("")
        lines.append(f"cold start, best of {cfg['runs']} (whole command, wall time):")
        for name, c in cold.items():
            extra = f"  ERROR {c['error']}" if "error" in c else ""
            all_t = ", ".join(f"{t:.2f}" for t in c["times_s"])
            lines.append(f"  {name:<18} {_fmt(c['best_s'], '>6.3f', ' s')}   [{all_t}]{extra}")
        cr = res["cold_ratios"]
        if cr.get("generate") is not None:
            ok = "ok" if cr["generate"] <= 0.5 else "ABOVE"
            lines.append(f"  mlxllm / mlx_lm generate: {cr['generate']:.2f} (target <= 0.5: {ok})")
            lines.append(
                "  (mlx_lm keeps fp16 weights: its cold start includes a slow fp16 prefill)"
            )
        h = cold["mlxllm --help"]["best_s"]
        if h is not None:
            ok = "ok" if h < 0.3 else "ABOVE"
            lines.append(f"  mlxllm --help: {h:.3f} s (target < 0.3 s: {ok})")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout model folder")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        help="prompt length in token ids (default 128: mlx-lm's fp16 prefill is slow on CPU)",
    )
    ap.add_argument("--gen-tokens", type=int, default=64, help="new tokens per timed run")
    ap.add_argument("--runs", type=int, default=3, help="cold-start repetitions (best is kept)")
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold-start timings")
    ap.add_argument("--skip-throughput", action="store_true", help="only time cold starts")
    ap.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})",
    )
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results file")
    ap.add_argument("--report", metavar="JSON", help="only print the table of a saved result")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker(args.worker, args.model, args.ids_file, args.gen_tokens)
    if args.report:
        print("\n".join(report(json.loads(Path(args.report).read_text()))))
        return

    model = Path(args.model).expanduser()
    if not (model / "config.json").exists():
        raise SystemExit(f"no model at {model} (set --model or MLXLLM_FIXTURES)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    env = bench_env()

    versions = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as m, json;"
            "print(json.dumps({p: m.version(p) for p in ('mlx', 'mlx-lm', 'mlxllm')}))",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        ver = json.loads(versions.stdout)
    except json.JSONDecodeError:
        ver = {}
    note = None
    if args.prompt_tokens < 512:
        note = (
            f"note: prompt of {args.prompt_tokens} tokens (not 512) because mlx-lm's fp16 prefill "
            "on the MLX CPU backend is very slow; use --prompt-tokens to change it"
        )
    res: dict = {
        "config": {
            "model": str(model),
            "prompt_file": str(EVAL_DIR / PROMPT_FILE),
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "runs": args.runs,
            "warmup": {"prompt_tokens": WARMUP_PROMPT, "gen_tokens": WARMUP_GEN},
            "variants": variants,
            "mlx": ver.get("mlx"),
            "mlx_lm": ver.get("mlx-lm"),
            "mlxllm": ver.get("mlxllm"),
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "ld_preload": env.get("LD_PRELOAD", ""),
            "note": note,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "throughput": {},
    }

    if not args.skip_throughput:
        ids = build_prompt(model, args.prompt_tokens)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(ids, f)
            ids_file = f.name
        try:
            for v in variants:
                print(f"running {VARIANTS[v]} ...", file=sys.stderr, flush=True)
                r = run_variant(v, model, ids_file, args.gen_tokens, env, args.timeout)
                res["throughput"][v] = r
                if "error" not in r:
                    print(
                        f"  prompt {r['prompt_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} "
                        f"tok/s, {r['generation_tokens']} tokens ({r['process_wall_s']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            os.unlink(ids_file)
        tp = res["throughput"]
        base = tp.get("mlxllm")
        if base and "error" not in base:
            res["ratios"], res["agreement"] = {}, {}
            for v in ("mlx-lm-fp16", "mlx-lm-fp32"):
                o = tp.get(v)
                if not o or "error" in o:
                    continue
                res["ratios"][VARIANTS[v].replace("mlx-lm ", "")] = {
                    "prompt": ratio(base["prompt_tps"], o["prompt_tps"]),
                    "decode": ratio(base["decode_tps"], o["decode_tps"]),
                    "peak_memory": ratio(base["peak_memory_gb"], o["peak_memory_gb"]),
                    "max_rss": ratio(base["max_rss_gb"], o["max_rss_gb"]),
                }
            for v in variants:
                if v != "mlxllm" and "error" not in tp[v]:
                    # mlx-lm's detokenizer drops the first token's leading space
                    a, b = base["text"].lstrip(), tp[v]["text"].lstrip()
                    res["agreement"][v] = (_prefix_match(a, b), min(len(a), len(b)))

    if not args.skip_cold:
        print(f"cold starts ({args.runs} runs) ...", file=sys.stderr, flush=True)
        res["cold_start"] = cold_start(model, args.runs, env)
        c = res["cold_start"]
        res["cold_ratios"] = {
            "generate": ratio(c["mlxllm generate"]["best_s"], c["mlx_lm generate"]["best_s"])
        }

    print("\n".join(report(res)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    main()
