"""Serving-engine benchmark: mlxllm's ``Engine`` against mlx-lm's ``BatchGenerator``, side by side.

Both runtimes get the same model (the same checkpoint folder, or the same random weights drawn
from a published config of ``moe_mla.CONFIGS``), the same dtype and the same prompts (random
token ids from a seeded numpy RNG); decoding is greedy and eos is ignored (mlxllm's engine gets no
eos ids, mlx-lm's generator no stop tokens), so every stream generates exactly ``--gen`` tokens in
both. Each runtime runs in its own subprocess (``engine.py --worker ...`` prints one ``RESULT``
line), and the two alternate over ``--repeats`` repeats (the order flips every repeat).

Scenarios (``--scenario``, default all):

- ``concurrency``: for each N of ``--streams``, N prompts of ``--prompt-len`` tokens submitted at
  once, ``--gen`` new tokens each.
- ``context``: the same with prompts of ``--context`` tokens (default 8192 on a GPU, 1024 on the
  CPU): aggregate decode at long context (DeepSeek-V2-Lite: mlxllm's MLA latent cache).
- ``agent``: one agent conversation, turns one after another: turn t's prompt is a system prompt
  of ``--system-len`` tokens, then every earlier turn (a user message of ``--user-len`` tokens and
  the tokens the runtime generated in that turn), then the new user message. Runs: mlxllm with its
  prefix store and without (``prefix_cache_bytes=0``); mlx-lm without reuse (every turn a fresh
  cache) and with the prompt cache of its server (``mlx_lm.models.cache.LRUPromptCache``: the
  cache of a finished request is stored under its tokens with ``insert_cache``; a new prompt takes
  ``fetch_nearest_cache`` and goes to ``BatchGenerator.insert(caches=, all_tokens=)``, the way
  ``mlx_lm.server`` does it).

Metrics, taken the same way for both runtimes from the wall clock around the public calls (a
token counts as arrived when the ``Engine.step()`` / ``BatchGenerator.next_generated()`` call
that returns it returns; the clock starts just before the prompts are submitted):

- TTFT: time to a stream's first token; mean over the streams and the max.
- decode tok/s (aggregate): the tokens that arrive after the moment every stream has its first
  token, over the time from that moment to the last token (with one stream: tokens after the
  first over the time from the first to the last, as in ``decode.py``). A stream that finishes
  before the last one starts is not in the window.
- wall: from submission to the last token of the last stream; throughput = N * gen / wall.
- peak GB: ``mx.get_peak_memory()`` over the measurement (weights included).
- agent: prompt tokens in all, prompt tokens computed (prompt length less the reused prefix, for
  both runtimes; mlxllm's ``EngineStats``: ``prompt_tokens - cached_tokens``), total time over
  the turns and the mean TTFT of a turn.

The report prints, per measurement, the median of each runtime over the repeats, the ratio
mlxllm / mlx-lm (median of the per-repeat ratios) and the spread (min-max of those ratios), and
how many streams generated the same tokens in both. Results also go to
``benchmarks/results/engine.json``::

    python benchmarks/engine.py --streams 1 4 --prompt-len 64 --gen 16 --repeats 2   # CPU
    python benchmarks/engine.py --model deepseek-v2-lite --layers 2 --scenario context \\
        --context 1024 --streams 2 --gen 8                                          # CPU
    python benchmarks/engine.py --model qwen2.5-7b --streams 1 4 16 32 --repeats 3   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, bench_env, run_worker
from _common import compare as _compare
from _common import fmt as _fmt
from _common import median as _median
from _common import table_row as _row

RESULTS = REPO / "benchmarks" / "results" / "engine.json"
SCENARIOS = ("concurrency", "context", "agent")
TOOLS = ("mlxllm", "mlx-lm")
CPU_BUDGET_GIB = 8.0  # mlxllm's memory budget on the CPU unless --memory-budget says otherwise
CPU_CONTEXT, GPU_CONTEXT = 1024, 8192
WARMUP = (2, 16, 4)  # streams, prompt tokens, new tokens of the untimed warm-up run


# ---------------------------------------------------------------------------------------------
# worker: one runtime, one scenario, one process


def _on_gpu(mx) -> bool:
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return True
    return mx.default_device() == mx.gpu


def _config(model: str, layers: int | None) -> dict:
    from moe_mla import CONFIGS

    if model in CONFIGS:
        config = dict(CONFIGS[model])
        if layers:
            config["num_hidden_layers"] = layers
        return config
    if layers:
        raise SystemExit("--layers only applies to a config name (random weights), not a folder")
    return json.loads((Path(model).expanduser() / "config.json").read_text())


def _load(tool: str, model: str, layers: int | None, dtype, seed: int):
    """The model of ``tool``: a checkpoint folder through each library's loader, or a config of
    ``moe_mla.CONFIGS`` with the same random checkpoint tensors for both (``moe_parity``)."""
    import mlx.core as mx
    from moe_mla import CONFIGS, _build

    if model in CONFIGS:
        config = _config(model, layers)
        # moe_parity turns TF32 off for its float32 parity check; that is not ours to decide
        tf32 = os.environ.get("MLX_ENABLE_TF32")
        from moe_parity import checkpoint_tensors

        if tf32 is None:
            os.environ.pop("MLX_ENABLE_TF32", None)
        tensors = checkpoint_tensors(config, seed)
        if tool == "mlxllm":
            from mlxllm.loader import model_from_weights

            # as mlxllm's loader leaves them: MoE routers stay float32
            net = model_from_weights(config, tensors, dtype)
        else:
            net, _, _ = _build("mlx-lm", config)
            weights = net.sanitize(tensors)
            net.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
        del tensors
    else:
        path = Path(model).expanduser()
        if tool == "mlxllm":
            from mlxllm.loader import load_model

            net = load_model(path, dtype=dtype)
        else:
            from mlx_lm.utils import load_model

            net, _ = load_model(path)
            net.set_dtype(dtype)
    net.eval()
    mx.eval(net.parameters())
    return net


class _Clock:
    """Arrival times of each stream's tokens (one timestamp per step call)."""

    def __init__(self, n: int):
        self.t0 = time.perf_counter()
        self.first: list[float | None] = [None] * n
        self.last: list[float | None] = [None] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.steps: list[tuple[float, int]] = []  # (time, tokens that arrived then)

    def arrived(self, now: float, got: list[tuple[int, int]]) -> None:
        for i, token in got:
            if self.first[i] is None:
                self.first[i] = now
            self.last[i] = now
            self.tokens[i].append(token)
        if got:
            self.steps.append((now, len(got)))

    def metrics(self) -> dict:
        if any(f is None for f in self.first):
            raise RuntimeError("a stream produced no token")
        ttft = [f - self.t0 for f in self.first]
        everyone = max(self.first)  # every stream has its first token
        end = max(self.last)
        window = sum(n for t, n in self.steps if t > everyone)
        return {
            "ttft_mean_s": statistics.fmean(ttft),
            "ttft_max_s": max(ttft),
            "decode_tokens": window,
            "decode_tps": window / (end - everyone) if end > everyone else None,
            "wall_s": end - self.t0,
            "throughput_tps": sum(len(t) for t in self.tokens) / (end - self.t0),
            "generated": [len(t) for t in self.tokens],
        }


def _run_mlxllm(engine, prompts: list[list[int]], gen: int) -> _Clock:
    from mlxllm.engine import Request

    clock = _Clock(len(prompts))
    ids = [engine.submit(Request(prompt=p, max_tokens=gen)) for p in prompts]
    row = {rid: i for i, rid in enumerate(ids)}
    while engine.busy:
        events = engine.step()
        now = time.perf_counter()
        for ev in events:
            if ev.finish_reason in ("error", "cancelled"):
                raise RuntimeError(f"request {ev.request_id}: {ev.finish_reason}: {ev.error}")
        clock.arrived(now, [(row[e.request_id], e.token) for e in events if e.token is not None])
    return clock


def _run_mlx_lm(gen_obj, prompts, gen: int, caches=None, all_tokens=None):
    """``(clock, finished)``: ``finished[i]`` is stream i's ``(all_tokens, prompt_cache)``."""
    clock = _Clock(len(prompts))
    uids = gen_obj.insert(
        prompts, max_tokens=[gen] * len(prompts), caches=caches, all_tokens=all_tokens
    )
    row = {u: i for i, u in enumerate(uids)}
    finished: dict[int, tuple] = {}
    while len(finished) < len(prompts):
        responses = gen_obj.next_generated()
        now = time.perf_counter()
        if not responses:
            raise RuntimeError("mlx-lm's BatchGenerator stopped before every stream finished")
        clock.arrived(now, [(row[r.uid], r.token) for r in responses])
        for r in responses:
            if r.finish_reason is not None:
                finished[row[r.uid]] = (r.all_tokens, r.prompt_cache)
    return clock, finished


class _Runtime:
    """One runtime's fresh engine / generator per measurement."""

    def __init__(self, tool: str, model, args, on_gpu: bool):
        self.tool, self.model, self.args = tool, model, args
        budget = args.memory_budget
        if budget is None and not on_gpu:
            budget = CPU_BUDGET_GIB
        self.budget = None if budget is None else int(budget * 2**30)
        self.settings: dict = {}

    def engine(self, streams: int, prefix_cache: bool = True):
        if self.tool == "mlxllm":
            from mlxllm.engine import Engine

            kw = (
                {}
                if self.args.prefill_chunk is None
                else {"prefill_chunk": self.args.prefill_chunk}
            )
            eng = Engine(
                self.model,
                eos_token_ids=(),
                max_batch=max(32, streams),
                memory_budget=self.budget,
                prefix_cache_bytes=None if prefix_cache else 0,
                **kw,
            )
            self.settings = {
                "max_batch": eng.max_batch,
                "prefill_chunk": eng.prefill_chunk,
                "memory_budget_gib": round(eng.budget / 2**30, 2),
            }
            return eng
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(self.model, stop_tokens=None, completion_batch_size=max(32, streams))
        self.settings = {
            "completion_batch_size": gen.completion_batch_size,
            "prefill_batch_size": gen.prefill_batch_size,
            "prefill_step_size": gen.prefill_step_size,
        }
        return gen

    def batch(self, prompts: list[list[int]], gen: int) -> dict:
        """One concurrent batch on a fresh engine / generator: metrics and tokens."""
        import mlx.core as mx

        obj = self.engine(len(prompts))
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        if self.tool == "mlxllm":
            clock = _run_mlxllm(obj, prompts, gen)
            extra = {"cached_tokens": obj.stats.cached_tokens}
        else:
            clock, _ = _run_mlx_lm(obj, prompts, gen)
            obj.close()
            extra = {}
        out = {**clock.metrics(), **extra, "peak_gb": mx.get_peak_memory() / 1e9}
        out["tokens"] = clock.tokens
        del obj
        return out


def _prompts(seed, n: int, length: int, vocab: int) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng([seed, n, length]).integers(0, vocab, (n, length)).tolist()


def _agent_mlxllm(rt: _Runtime, system, users, gen: int, prefix_cache: bool) -> dict:
    import mlx.core as mx

    eng = rt.engine(1, prefix_cache=prefix_cache)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    history, turns = list(system), []
    for user in users:
        prompt = history + user
        before = (eng.stats.prompt_tokens, eng.stats.cached_tokens, eng.stats.prefill_tokens)
        clock = _run_mlxllm(eng, [prompt], gen)
        m = clock.metrics()
        s = eng.stats
        turns.append({
            "prompt": len(prompt),
            "reused": s.cached_tokens - before[1],
            "computed": (s.prompt_tokens - before[0]) - (s.cached_tokens - before[1]),
            "prefill_tokens": s.prefill_tokens - before[2],  # mlxllm's own counter
            "ttft_s": m["ttft_mean_s"],
            "time_s": m["wall_s"],
            "tokens": clock.tokens[0],
        })  # fmt: skip
        history = prompt + clock.tokens[0]
    return {"turns": turns, "peak_gb": mx.get_peak_memory() / 1e9}


def _agent_mlx_lm(rt: _Runtime, system, users, gen: int, reuse: bool) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import LRUPromptCache

    gen_obj = rt.engine(1)
    store = LRUPromptCache() if reuse else None  # mlx_lm.server's defaults (10 entries)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    history, turns = list(system), []
    for user in users:
        prompt = history + user
        t = time.perf_counter()
        cache, rest = store.fetch_nearest_cache("model", prompt) if reuse else (None, prompt)
        reused = len(prompt) - len(rest)
        lookup_s = time.perf_counter() - t
        clock, finished = _run_mlx_lm(
            gen_obj, [rest], gen, caches=[cache], all_tokens=[prompt[:reused]]
        )
        clock.t0 = t  # the lookup (and its deep copy of the cache) counts in the turn's time
        if reuse:
            all_tokens, prompt_cache = finished[0]
            store.insert_cache("model", all_tokens[:], prompt_cache, cache_type="assistant")
        m = clock.metrics()
        turns.append({
            "prompt": len(prompt),
            "reused": reused,
            "computed": len(rest),
            "lookup_s": lookup_s,
            "ttft_s": m["ttft_mean_s"],
            "time_s": m["wall_s"],
            "tokens": clock.tokens[0],
        })  # fmt: skip
        history = prompt + clock.tokens[0]
    gen_obj.close()
    return {"turns": turns, "peak_gb": mx.get_peak_memory() / 1e9}


def _agent_summary(run: dict) -> dict:
    turns = run["turns"]
    return {
        "prompt_tokens": sum(t["prompt"] for t in turns),
        "computed_tokens": sum(t["computed"] for t in turns),
        "reused_tokens": sum(t["reused"] for t in turns),
        "total_s": sum(t["time_s"] for t in turns),
        "ttft_mean_s": statistics.fmean(t["ttft_s"] for t in turns),
        "peak_gb": run["peak_gb"],
        # mlxllm's own counter: computed less one per turn (the last prompt token runs in the
        # first decode step, not in prefill)
        "prefill_tokens": sum(t.get("prefill_tokens", 0) for t in turns) or None,
    }


def worker(tool: str, scenario: str, args) -> dict:
    import importlib.metadata as md

    import mlx.core as mx

    on_gpu = _on_gpu(mx)
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(mx, dtype_name)
    config = _config(args.model, args.layers)
    vocab = config["vocab_size"]
    t = time.perf_counter()
    model = _load(tool, args.model, args.layers, dtype, args.seed)
    load_s = time.perf_counter() - t
    rt = _Runtime(tool, model, args, on_gpu)
    w_streams, w_len, w_gen = WARMUP  # untimed: allocator, BLAS threads, kernel compilation
    rt.batch(_prompts(args.seed + 1, w_streams, w_len, vocab), w_gen)

    res: dict = {
        "tool": tool,
        "scenario": scenario,
        "device": str(mx.default_device()),
        "gpu": on_gpu,
        "dtype": dtype_name,
        "layers": config["num_hidden_layers"],
        "load_s": load_s,
        "versions": {p: md.version(p) for p in ("mlx", "mlx-lm")},
    }
    if scenario in ("concurrency", "context"):
        length = args.prompt_len
        if scenario == "context":
            length = args.context or (GPU_CONTEXT if on_gpu else CPU_CONTEXT)
        res["prompt_len"] = length
        res["points"] = []
        for n in args.streams:
            point = rt.batch(_prompts(args.seed, n, length, vocab), args.gen)
            res["points"].append({"streams": n, **point})
            print(f"{tool} {scenario} N={n}: {json.dumps(point)[:300]}", file=sys.stderr)
    else:
        import numpy as np

        rng = np.random.default_rng([args.seed, 1_000_003])
        system = rng.integers(0, vocab, args.system_len).tolist()
        users = [rng.integers(0, vocab, args.user_len).tolist() for _ in range(args.turns)]
        if tool == "mlxllm":
            runs = {
                "prefix cache": lambda s, u: _agent_mlxllm(rt, s, u, args.gen, True),
                "no prefix cache": lambda s, u: _agent_mlxllm(rt, s, u, args.gen, False),
            }
        else:
            runs = {
                "LRUPromptCache": lambda s, u: _agent_mlx_lm(rt, s, u, args.gen, True),
                "no reuse": lambda s, u: _agent_mlx_lm(rt, s, u, args.gen, False),
            }
        # untimed: three turns of another conversation of the same lengths through every run,
        # so that the first timed run does not pay the kernel compilation of these shapes
        warm = np.random.default_rng([args.seed, 7])
        warm_system = warm.integers(0, vocab, args.system_len).tolist()
        warm_users = [warm.integers(0, vocab, args.user_len).tolist() for _ in range(3)]
        for fn in runs.values():
            fn(warm_system, warm_users)
        res["runs"] = {}
        for name, fn in runs.items():
            run = fn(system, users)
            res["runs"][name] = {**_agent_summary(run), "turns": run["turns"]}
            print(f"{tool} agent {name}: {_agent_summary(run)}", file=sys.stderr)
    res["settings"] = rt.settings
    return res


# ---------------------------------------------------------------------------------------------
# driver

# (key, label, format); "higher" says which way is better, for the reader
BATCH_METRICS = (
    ("ttft_mean_s", "TTFT mean s (lower)", ".3f"),
    ("ttft_max_s", "TTFT max s (lower)", ".3f"),
    ("decode_tps", "decode tok/s (higher)", ".1f"),
    ("wall_s", "wall s (lower)", ".2f"),
    ("throughput_tps", "throughput tok/s (higher)", ".1f"),
    ("peak_gb", "peak GB (lower)", ".3f"),
)
AGENT_METRICS = (
    ("prompt_tokens", "prompt tokens", "d"),
    ("computed_tokens", "prompt tokens computed (lower)", "d"),
    ("reused_tokens", "prompt tokens reused", "d"),
    ("total_s", "total s (lower)", ".2f"),
    ("ttft_mean_s", "TTFT mean s per turn (lower)", ".3f"),
    ("peak_gb", "peak GB (lower)", ".3f"),
)
AGENT_PAIRS = (("prefix cache", "LRUPromptCache"), ("no prefix cache", "no reuse"))


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, float]:
    """(streams with identical tokens, streams, mean length of the common first tokens)."""
    same, prefix = 0, []
    for x, y in zip(a, b, strict=True):
        same += x == y
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
        prefix.append(n)
    return same, len(a), statistics.fmean(prefix) if prefix else 0.0


def summarize_batch(runs: dict) -> tuple[list, list[str]]:
    a_runs, b_runs = runs["mlxllm"], runs["mlx-lm"]
    rows, lines = [], []
    head = "| streams | metric | mlxllm | mlx-lm | ratio | spread |"
    lines += [head, "|---|---|---|---|---|---|"]
    for i, point in enumerate(a_runs[0]["points"]):
        n = point["streams"]
        row = {"streams": n}
        for key, label, spec in BATCH_METRICS:
            c = _compare(
                [r["points"][i][key] for r in a_runs], [r["points"][i][key] for r in b_runs]
            )
            row[key] = c
            lines.append(_row(f"{n} | {label}", c, spec))
        same = _same_tokens(a_runs[0]["points"][i]["tokens"], b_runs[0]["points"][i]["tokens"])
        row["same_tokens"] = same
        row["generated"] = {
            "mlxllm": a_runs[0]["points"][i]["generated"],
            "mlx-lm": b_runs[0]["points"][i]["generated"],
        }
        row["mlxllm_cached_tokens"] = a_runs[0]["points"][i].get("cached_tokens")
        rows.append(row)
    lines.append("")
    for row in rows:
        s, n, p = row["same_tokens"]
        gen = sorted(set(row["generated"]["mlxllm"] + row["generated"]["mlx-lm"]))
        lines.append(
            f"N={row['streams']}: tokens per stream {gen}; streams with identical tokens in "
            f"both (first repeat) {s}/{n}, mean common first tokens {p:.1f}; mlxllm prompt "
            f"tokens from its prefix store {row['mlxllm_cached_tokens']}"
        )
    return rows, lines


def summarize_agent(runs: dict) -> tuple[dict, list[str]]:
    a_runs, b_runs = runs["mlxllm"], runs["mlx-lm"]
    lines = ["| run | " + " | ".join(label for _, label, _ in AGENT_METRICS) + " |"]
    lines.append("|---" * (len(AGENT_METRICS) + 1) + "|")
    for tool, rs in (("mlxllm", a_runs), ("mlx-lm", b_runs)):
        for name in rs[0]["runs"]:
            vals = [
                _fmt(_median([r["runs"][name][k] for r in rs]), spec)
                for k, _, spec in AGENT_METRICS
            ]
            lines.append(f"| {tool}, {name} | " + " | ".join(vals) + " |")
    out: dict = {}
    for mine, theirs in AGENT_PAIRS:
        lines += ["", f"mlxllm {mine} / mlx-lm {theirs}:", "| metric | mlxllm | mlx-lm | ratio | "
                  "spread |", "|---|---|---|---|---|"]  # fmt: skip
        pair = {}
        for key, label, spec in AGENT_METRICS:
            c = _compare(
                [r["runs"][mine][key] for r in a_runs], [r["runs"][theirs][key] for r in b_runs]
            )
            pair[key] = c
            lines.append(_row(label, c, spec))
        out[f"{mine} / {theirs}"] = pair
    lines.append("")
    tok = {f"mlxllm, {k}": [t["tokens"] for t in v["turns"]] for k, v in a_runs[0]["runs"].items()}
    tok |= {f"mlx-lm, {k}": [t["tokens"] for t in v["turns"]] for k, v in b_runs[0]["runs"].items()}
    names = list(tok)
    base = names[0]
    for other in names[1:]:
        s, n, p = _same_tokens(tok[base], tok[other])
        lines.append(f"turns with identical tokens, {base} vs {other}: {s}/{n} (first repeat)")
        out.setdefault("same_tokens", {})[other] = (s, n, p)
    return out, lines


def _worker_args(tool: str, scenario: str, args) -> list[str]:
    out = [tool, "--scenario", scenario, "--model", str(args.model), "--gen", str(args.gen)]
    out += ["--streams", *map(str, args.streams), "--prompt-len", str(args.prompt_len)]
    out += ["--system-len", str(args.system_len), "--turns", str(args.turns)]
    out += ["--user-len", str(args.user_len), "--seed", str(args.seed)]
    for flag, value in (
        ("--context", args.context),
        ("--layers", args.layers),
        ("--dtype", args.dtype),
        ("--memory-budget", args.memory_budget),
        ("--prefill-chunk", args.prefill_chunk),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="a Hugging Face checkpoint folder, or a config of moe_mla.CONFIGS (random weights)",
    )
    ap.add_argument("--layers", type=int, default=None, help="cut a config to N layers (CPU)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--scenario", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32, help="new tokens per stream (and per turn)")
    ap.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"prompt tokens of the context scenario (default {GPU_CONTEXT} on a GPU, "
        f"{CPU_CONTEXT} on CPU)",
    )
    ap.add_argument("--system-len", type=int, default=4096)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per runtime")
    ap.add_argument("--seed", type=int, default=0, help="prompts and random weights")
    ap.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help=f"mlxllm Engine memory_budget in GiB (default {CPU_BUDGET_GIB:g} on CPU, the "
        "engine's own default on a GPU)",
    )
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="mlxllm Engine prefill_chunk (default: its own)",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results file")
    ap.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if len(args.scenario) != 1:
            raise SystemExit("a worker runs one scenario")
        res = worker(args.worker, args.scenario[0], args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    env = bench_env()
    results: dict = {"args": vars(args), "scenarios": {}}
    report: list[str] = []
    for scenario in args.scenario:
        runs: dict = {t: [] for t in TOOLS}
        for rep in range(args.repeats):
            order = TOOLS if rep % 2 == 0 else TOOLS[::-1]  # drift hits both alike
            for tool in order:
                print(f"[{scenario}] repeat {rep + 1}/{args.repeats}: {tool} ...", file=sys.stderr)
                r = run_worker(__file__, _worker_args(tool, scenario, args), env, args.timeout)
                if "error" in r:
                    print(f"  ERROR {r['error']}", file=sys.stderr)
                else:
                    print(f"  done in {r['process_wall_s']:.0f} s", file=sys.stderr, flush=True)
                runs[tool].append(r)
        entry: dict = {"runs": runs}
        results["scenarios"][scenario] = entry
        errors = {t: r["error"] for t in TOOLS for r in runs[t] if "error" in r}
        if errors:
            report += [f"## {scenario}: ERROR", *(f"{t}: {e}" for t, e in errors.items()), ""]
            continue
        a, b = runs["mlxllm"][0], runs["mlx-lm"][0]
        title = f"## {scenario}: {Path(args.model).name}"
        title += f" ({a['layers']} layers)" if args.model in _configs() else ""
        report.append(
            f"{title}, {a['dtype']} on {a['device']}, mlx {a['versions']['mlx']}, mlx-lm "
            f"{a['versions']['mlx-lm']}; median of {args.repeats} alternating runs; "
            "ratio = mlxllm / mlx-lm (median of the per-repeat ratios), spread = their min-max"
        )
        report.append(f"mlxllm Engine: {a['settings']}; mlx-lm BatchGenerator: {b['settings']}")
        if scenario == "agent":
            report.append(
                f"system prompt {args.system_len} tokens, {args.turns} turns of a {args.user_len}"
                f"-token user message + {args.gen} generated tokens; mlx-lm reuse: "
                "mlx_lm.models.cache.LRUPromptCache as mlx_lm.server uses it; computed = prompt"
                " - reused (mlxllm: EngineStats prompt_tokens - cached_tokens)"
            )
            entry["summary"], lines = summarize_agent(runs)
        else:
            report.append(
                f"prompts of {a['prompt_len']} tokens, {args.gen} new tokens per stream, greedy, "
                "eos ignored; decode tok/s counts the tokens after every stream has its first one"
            )
            entry["summary"], lines = summarize_batch(runs)
        report += lines + [""]
    for entry in results["scenarios"].values():  # tokens were only for the comparison
        for rs in entry["runs"].values():
            for r in rs:
                for p in r.get("points", []):
                    p.pop("tokens", None)
                for run in r.get("runs", {}).values():
                    for t in run.get("turns", []):
                        t.pop("tokens", None)
    print("\n" + "\n".join(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")


def _configs():
    from moe_mla import CONFIGS

    return CONFIGS


if __name__ == "__main__":
    main()
