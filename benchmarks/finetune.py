"""Side-by-side LoRA fine-tuning benchmark: mlxllm against mlx-lm on the same model and data.

Both runtimes train the same LoRA adapters (rank 8, scale 20, no dropout) on the same linears of
the same last ``--num-layers`` blocks: mlx-lm's default targets, which are every linear of a
block (``q/k/v/o_proj`` and ``gate/up/down_proj`` for Qwen2); the mlx-lm worker reports the
modules it adapted and the driver checks that mlxllm adapted the same ones.

The data is a synthetic chat data set written by the benchmark (fictional Q/A, every example
longer than ``--max-seq-length``), so both runtimes truncate every example to exactly
``--max-seq-length`` tokens: every batch is ``batch x (max_seq_length - 1)`` input positions on
both sides, with no padding and no prompt masking (mlx-lm's default, ``mask_prompt=False``).

Each runtime runs in its own subprocess (so peak memory and warm caches never mix), prints one
JSON line, and is timed the same way: a callback timestamps the end of every optimizer step;
the first ``--warmup`` steps (graph compilation, allocator warm-up) are excluded; trained
tokens/s is the number of loss-target tokens of the timed steps (identical on both sides) over
their wall time. No validation and no checkpoint falls inside the timed steps. Peak MLX memory
is ``mx.get_peak_memory()`` over the timed steps (reset after the warm-up); max RSS is the
process's high-water mark (including loading).

Variants:

- ``mlxllm``        float32 (mlxllm's compute dtype on MLX's CPU backend)
- ``mlx-lm-fp32``   mlx-lm with the model cast to float32 (same math as mlxllm on CPU)
- ``mlx-lm-fp16``   mlx-lm as it loads the checkpoint (float16); skipped by default on the CPU
                    backend, where float16 matmuls are ~30x slower (``--variants`` forces it)

Results: a table with absolute figures and mlxllm / mlx-lm ratios, also written as JSON to
``benchmarks/results/finetune.json``.

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/finetune.py [--steps 10] [--repeats 3] [--batch-size 4]

Environment: ``MLXLLM_FIXTURES`` (model folder root, default ``~/.cache/mlxllm-fixtures/models``).
On Linux OpenBLAS is preloaded into every subprocess when it is installed and ``LD_PRELOAD``
does not name it already (MLX's CPU wheel bundles a much slower reference BLAS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, bench_env, ratio, run_worker

RESULTS = REPO / "benchmarks" / "results" / "finetune.json"

VARIANTS = {
    "mlxllm": "mlxllm (fp32 default on CPU)",
    "mlx-lm-fp32": "mlx-lm (cast to float32)",
    "mlx-lm-fp16": "mlx-lm (default, fp16 as stored)",
}
# mlx-lm's default LoRA keys: every linear of a block (checked at run time by the mlx-lm worker)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, SCALE, DROPOUT, LEARNING_RATE = 8, 20.0, 0.0, 1e-5


# ---------------------------------------------------------------------------------------------
# worker: one runtime, one process; prints a JSON line on stdout


class StepClock:
    """Timestamps the end of every step; resets the peak memory counter after the warm-up."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.times: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.peak = None

    def tick(self, step: int, loss: float) -> None:
        import mlx.core as mx

        now = time.perf_counter()
        self.times[step] = now
        self.losses[step] = loss
        if step == self.warmup:
            mx.reset_peak_memory()
        elif step == self.warmup + self.steps:
            self.peak = mx.get_peak_memory()

    def result(self, tokens: list[float]) -> dict:
        w, n = self.warmup, self.steps
        if w + n not in self.times:
            raise RuntimeError(f"training stopped before step {w + n}")
        dt = self.times[w + n] - self.times[w]
        step_s = [self.times[i] - self.times[i - 1] for i in range(w + 1, w + n + 1)]
        return {
            "timed_s": dt,
            "step_s": step_s,
            "tokens_timed": sum(tokens),
            "tokens_per_step": tokens,
            "tps": sum(tokens) / dt,
            "peak_memory_gb": self.peak / 1e9,
            "first_loss": self.losses[1],
            "last_loss": self.losses[w + n],
        }


def _adapted(model) -> list[str]:
    """Sorted ``block.path`` names of the adapted linears (those holding a ``lora_a``)."""
    from mlx.utils import tree_flatten

    names = set()
    for k, _ in tree_flatten(model.trainable_parameters()):
        parts = k.split(".")
        if "layers" in parts and parts[-1] in ("lora_a", "lora_b"):
            i = parts.index("layers")
            names.add(".".join(parts[i + 1 : -1]))
    return sorted(names, key=lambda s: (int(s.split(".")[0]), s))


def _dtype(model) -> str:
    """The dtype of the frozen base weights (the first non-adapter parameter)."""
    from mlx.utils import tree_flatten

    for k, v in tree_flatten(model.parameters()):
        if "lora" not in k:
            return str(v.dtype).replace("mlx.core.", "")
    return "?"


def _count(tree) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(tree))


def _run_mlxllm(cfg: dict, out_dir: str) -> dict:
    import mlx.core as mx

    from mlxllm.lora import train as lora_train
    from mlxllm.lora.data import batch_at, collate, load_dataset, make_batches
    from mlxllm.lora.train import finetune
    from mlxllm.tokenizer import load_tokenizer

    w, n, bs, L = cfg["warmup"], cfg["steps"], cfg["batch_size"], cfg["max_seq_length"]
    seed = 0
    # the loss-target tokens of each step, from the same batches `train` draws
    tok = load_tokenizer(cfg["model"])
    data = load_dataset(cfg["data"], tok, L, mask_prompt=False)["train"]
    batches = make_batches(data, bs)
    tokens = [
        float(collate([data[i] for i in batch_at(batches, s, seed)])[2].sum())
        for s in range(w, w + n)
    ]
    lengths = [len(e.ids) for e in data]

    clock = StepClock(w, n)
    info: dict = {}
    orig_train = lora_train.train

    def spy_train(model, *a, **k):  # records what `finetune` built; changes nothing
        info["dtype"] = _dtype(model)
        info["adapted"] = _adapted(model)
        info["trainable_params"] = _count(model.trainable_parameters())
        return orig_train(model, *a, **k)

    lora_train.train = spy_train
    t = time.perf_counter()
    finetune(
        cfg["model"],
        cfg["data"],
        adapter_path=out_dir,
        rank=RANK,
        scale=SCALE,
        dropout=DROPOUT,
        num_layers=cfg["num_layers"],
        targets=TARGETS,
        seed=seed,
        dtype=mx.float32,
        # one step more than timed: `train` writes its final checkpoint inside the last step
        iters=w + n + 1,
        batch_size=bs,
        learning_rate=LEARNING_RATE,
        max_seq_length=L,
        mask_prompt=False,
        save_every=0,
        eval_every=0,
        steps_per_report=10**9,
        progress=False,
        callback=lambda step, i: clock.tick(step, i["loss"]),
    )
    r = clock.result(tokens)
    r.update(info)
    r["total_s"] = time.perf_counter() - t
    r["example_tokens"] = [min(lengths), max(lengths)]
    r["optimizer"] = "Adam (AdamW without decay), cosine schedule"
    return r


def _run_mlx_lm(cfg: dict, out_dir: str, dtype: str | None) -> dict:
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    w, n, bs, L = cfg["warmup"], cfg["steps"], cfg["batch_size"], cfg["max_seq_length"]
    t = time.perf_counter()
    model, tokenizer = load(cfg["model"])
    if dtype:
        model.set_dtype(getattr(mx, dtype))
    mx.random.seed(0)
    model.freeze()
    lora = {"rank": RANK, "dropout": DROPOUT, "scale": SCALE}  # default keys: mlx-lm picks
    linear_to_lora_layers(model, cfg["num_layers"], lora)
    mx.eval(model.parameters())
    train_set, _, _ = load_local_dataset(
        Path(cfg["data"]), tokenizer, SimpleNamespace(mask_prompt=False)
    )
    train_set = CacheDataset(train_set)
    lengths = [len(train_set[i][0]) for i in range(len(train_set))]

    clock = StepClock(w, n)
    tokens: dict[int, float] = {}

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):  # steps_per_report=1: after every step
            tokens[info["iteration"]] = float(info["trained_tokens"])
            clock.tick(info["iteration"], info["train_loss"])

    args = TrainingArgs(
        batch_size=bs,
        iters=w + n,
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=L,
        adapter_file=str(Path(out_dir) / "adapters.safetensors"),
    )
    train(
        model=model,
        optimizer=optim.Adam(learning_rate=LEARNING_RATE),  # mlx-lm's default optimizer
        train_dataset=train_set,
        val_dataset=None,
        args=args,
        training_callback=Clock(),
    )
    # trained_tokens is cumulative: per-step counts are its differences
    per_step = [tokens[s] - tokens[s - 1] for s in range(w + 1, w + n + 1)]
    r = clock.result(per_step)
    r["dtype"] = _dtype(model)
    r["adapted"] = _adapted(model)
    r["trainable_params"] = _count(model.trainable_parameters())
    r["total_s"] = time.perf_counter() - t
    r["example_tokens"] = [min(lengths), max(lengths)]
    r["optimizer"] = "Adam, constant learning rate"
    return r


def worker(variant: str, cfg_file: str) -> None:
    cfg = json.loads(Path(cfg_file).read_text())
    with tempfile.TemporaryDirectory(prefix="mlxllm-ft-") as out:
        if variant == "mlxllm":
            r = _run_mlxllm(cfg, out)
        else:
            r = _run_mlx_lm(cfg, out, "float32" if variant == "mlx-lm-fp32" else None)
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r["max_rss_gb"] = rss / (1e9 if sys.platform == "darwin" else 1e6)
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------------------------------------
# driver

PLACES = ["Vellmora", "Quistaran", "Obrenhal", "Tazrek", "Lunmarrow", "Ishvaldt", "Corrinthe"]
THINGS = ["lantern guild", "salt archive", "glass orchard", "river court", "copper choir"]
VERBS = ["maintains", "records", "trades", "repairs", "guards", "catalogues", "celebrates"]
OBJECTS = [
    "tide maps",
    "brass clocks",
    "winter seeds",
    "storm ledgers",
    "silk kites",
    "stone bridges",
    "ink wells",
    "moon calendars",
]
WHENS = ["every spring", "at dusk", "after the long rains", "twice a year", "on market days"]


def write_dataset(folder: Path, rows: int, max_seq_length: int, seed: int = 0) -> None:
    """Fictional Q/A chats, each longer than ``max_seq_length`` tokens (so all truncate alike)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_sentences = max(4, max_seq_length // 7)  # ~9-10 tokens a sentence: ~1.4x the length

    def row():
        place, thing = rng.choice(PLACES), rng.choice(THINGS)
        q = f"What does the {thing} of {place} do, and when?"
        sentences = [
            f"The {thing} of {place} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHENS)}."
            for _ in range(n_sentences)
        ]
        return {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": " ".join(sentences)},
            ]
        }

    for name, n in (("train", rows), ("valid", max(4, rows // 8))):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(row()) + "\n")


def run_variant(variant: str, cfg_file: str, env: dict, timeout: float) -> dict:
    return run_worker(__file__, [variant, "--cfg-file", cfg_file], env, timeout)


def _fmt(x, spec=".2f"):
    return "-" if x is None else f"{x:{spec}}"


def report(res: dict) -> list[str]:
    cfg = res["config"]
    lines = [
        f"model {Path(cfg['model']).name} | LoRA rank {RANK} scale {SCALE:g} on "
        f"{'/'.join(t.replace('_proj', '') for t in TARGETS)} _proj of the last "
        f"{cfg['num_layers']} blocks | {cfg['rows']} synthetic chats, batch {cfg['batch_size']} x "
        f"{cfg['max_seq_length']} tokens | {cfg['steps']} timed steps after {cfg['warmup']} "
        "warm-up, no validation",
        f"mlx {cfg['mlx']} | mlx-lm {cfg['mlx_lm']} | mlxllm {cfg['mlxllm']} | "
        f"{cfg['cpus']} CPUs | LD_PRELOAD={cfg['ld_preload'] or '-'}",
        "tok/s = loss-target tokens of the timed steps / their wall time (the same count on "
        "both sides: batch x (max_seq_length - 1), no padding, no prompt mask)",
        "",
    ]
    head = (
        f"{'runtime':<32} {'dtype':>7} {'tok/s':>8} {'s/step':>7} {'tok/step':>8} "
        f"{'peak MLX GB':>11} {'max RSS GB':>10} {'params':>8} {'loss 1->end':>12}"
    )
    lines += [head, "-" * len(head)]
    for v, r in res["runs"].items():
        if "skipped" in r:
            lines.append(f"{VARIANTS[v]:<32} skipped: {r['skipped']}")
            continue
        if "error" in r:
            lines.append(f"{VARIANTS[v]:<32} ERROR {r['error']}")
            continue
        tps = r["tokens_timed"] / len(r["step_s"])
        lines.append(
            f"{VARIANTS[v]:<32} {r['dtype']:>7} {r['tps']:>8.1f} "
            f"{r['timed_s'] / len(r['step_s']):>7.2f} {tps:>8.0f} {r['peak_memory_gb']:>11.3f} "
            f"{r['max_rss_gb']:>10.3f} {r['trainable_params'] / 1e6:>7.2f}M "
            f"{r['first_loss']:>5.2f}->{r['last_loss']:<5.2f}"
        )
    if res.get("ratios"):
        lines += [
            "",
            f"{'mlxllm / mlx-lm':<32} {'tok/s':>7} {'(>= 1.0)':>8} {'peak MLX':>9} "
            f"{'(<= 1.0)':>8} {'max RSS':>8}",
        ]
        for k, r in res["ratios"].items():
            ok_t = "" if r["tps"] is None else ("ok" if r["tps"] >= 1.0 else "BELOW")
            ok_m = (
                "" if r["peak_memory"] is None else ("ok" if r["peak_memory"] <= 1.0 else "ABOVE")
            )
            lines.append(
                f"  vs {k:<28} {_fmt(r['tps'], '>7.2f')} {ok_t:>8} "
                f"{_fmt(r['peak_memory'], '>9.2f')} {ok_m:>8} {_fmt(r['max_rss'], '>8.2f')}"
            )
    for note in res.get("notes", []):
        lines.append(note)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-layout model folder")
    ap.add_argument("--rows", type=int, default=64, help="training examples (default 64)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=8, help="adapt the last N blocks")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all, but mlx-lm-fp16 only "
        "off the CPU backend)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the variants this many times, alternating; report each variant's median run",
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON ('' to skip)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cfg-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")

    if a.worker:
        worker(a.worker, a.cfg_file)
        return

    from importlib.metadata import version

    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    variants = a.variants.split(",") if a.variants else list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    env = bench_env()
    cfg = dict(
        model=str(Path(a.model).expanduser()),
        rows=a.rows,
        batch_size=a.batch_size,
        max_seq_length=a.max_seq_length,
        num_layers=a.num_layers,
        steps=a.steps,
        warmup=a.warmup,
        targets=list(TARGETS),
        rank=RANK,
        scale=SCALE,
        learning_rate=LEARNING_RATE,
        mlx=version("mlx"),
        mlx_lm=version("mlx-lm"),
        mlxllm=version("mlxllm"),
        cpus=os.cpu_count(),
        device=str(mx.default_device()),
        ld_preload=env.get("LD_PRELOAD", ""),
        platform=platform.platform(),
    )
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mlxllm-ft-bench-") as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, a.rows, a.max_seq_length)
        cfg["data"] = str(data)
        cfg_file = Path(tmp) / "config.json"
        cfg_file.write_text(json.dumps(cfg))
        every: dict[str, list[dict]] = {}
        for rep in range(a.repeats):
            for v in variants:
                if v == "mlx-lm-fp16" and on_cpu and not a.variants:
                    runs[v] = {
                        "skipped": "float16 matmuls are ~30x slower than float32 on MLX's CPU "
                        "backend (hours at this size); --variants mlx-lm-fp16 forces it"
                    }
                    continue
                print(f"running {v} ({rep + 1}/{a.repeats}) ...", file=sys.stderr, flush=True)
                r = run_variant(v, str(cfg_file), env, a.timeout)
                if "error" in r:
                    print(f"  {v}: ERROR {r['error']}", file=sys.stderr, flush=True)
                    runs[v] = r
                    continue
                every.setdefault(v, []).append(r)
                print(
                    f"  {v}: {r['tps']:.1f} tok/s, {r['process_wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        for v, rs in every.items():
            if "error" in runs.get(v, {}):
                continue
            rs = sorted(rs, key=lambda r: r["tps"])
            runs[v] = dict(rs[(len(rs) - 1) // 2], tps_runs=[r["tps"] for r in rs])
    cfg.pop("data")

    notes = []
    base = runs.get("mlxllm", {})
    ratios = {}
    for v, r in runs.items():
        if v.startswith("mlx-lm") and "tps" in r and "tps" in base:
            ratios[v] = {
                "tps": ratio(base["tps"], r["tps"]),
                "peak_memory": ratio(base["peak_memory_gb"], r["peak_memory_gb"]),
                "max_rss": ratio(base["max_rss_gb"], r["max_rss_gb"]),
            }
            if r["adapted"] != base["adapted"]:
                notes.append(f"WARNING: adapted linears differ from {v}'s")
            if r["tokens_per_step"] != base["tokens_per_step"]:
                notes.append(f"WARNING: tokens per step differ from {v}'s")
    if "adapted" in base:
        notes.append(
            f"adapted linears: {len(base['adapted'])} "
            f"({base['adapted'][0]} ... {base['adapted'][-1]}); the same set on every side: "
            + (
                "yes"
                if all(r.get("adapted") == base["adapted"] for r in runs.values() if "tps" in r)
                else "NO"
            )
        )
        lo, hi = base["example_tokens"]
        notes.append(f"example lengths after truncation: {lo}..{hi} tokens")
    notes.append(
        "optimizers: Adam on both sides (mlxllm with a cosine schedule, mlx-lm constant); "
        "both train steps are mx.compile'd"
    )
    if a.repeats > 1:
        notes.append(
            f"{a.repeats} alternating runs per variant; the table shows each variant's median "
            "run; tok/s of every run: "
            + "; ".join(
                f"{v} " + ", ".join(f"{t:.1f}" for t in r["tps_runs"])
                for v, r in runs.items()
                if "tps_runs" in r
            )
        )
    res = {"config": cfg, "runs": runs, "ratios": ratios, "notes": notes}
    lines = report(res)
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
