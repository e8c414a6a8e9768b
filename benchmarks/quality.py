"""Quantization quality: mlxllm's converter against mlx-lm's, same settings, same texts.

For the real fixture Qwen2.5-Coder-0.5B-Instruct, each setting (8-bit g64, 4-bit g64, 4-bit g32
and the mixed 4/6-bit recipe) is converted by ``mlxllm convert`` and by ``mlx_lm.convert``, and
every converted model is scored against the unquantized checkpoint over the fixed texts in
``../shared/fixtures/eval/``:

- perplexity (and its ratio to the reference's),
- mean KL divergence KL(reference || quantized) per predicted token,
- stored bits per weight (packed codes + scales + biases over the parameter count).

All models are evaluated by one runtime (mlxllm, float32, with the quantized weights
dequantized exactly once: the same values the quantized kernels use, computed with BLAS), so
the numbers compare the converters, not the runtimes. Texts are cut into ``--window``-token
windows (at most ``--windows`` per text).

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("MLXLLM_FIXTURES", "~/.cache/mlxllm-fixtures/models")).expanduser()
EVAL_DIR = Path(os.environ.get("MLXLLM_EVAL_FIXTURES", REPO.parent / "shared/fixtures/eval"))
RESULTS = REPO / "benchmarks" / "results" / "quality.json"

# name -> (mlxllm convert kwargs, mlx_lm.convert kwargs)
SETTINGS = {
    "8-bit g64": ({"bits": 8, "group_size": 64}, {"q_bits": 8, "q_group_size": 64}),
    "4-bit g64": ({"bits": 4, "group_size": 64}, {"q_bits": 4, "q_group_size": 64}),
    "4-bit g32": ({"bits": 4, "group_size": 32}, {"q_bits": 4, "q_group_size": 32}),
    "mixed 4/6": (
        {"recipe": "mixed_4_6", "group_size": 64},
        {"q_bits": 4, "q_group_size": 64, "quant_predicate": "mixed_4_6"},
    ),
}


def windows(tok, window: int, per_text: int) -> list[list[int]]:
    out = []
    for f in sorted(EVAL_DIR.glob("*.txt")):
        if f.name == "README.md":
            continue
        ids = tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False)
        for i in range(min(per_text, len(ids) // window)):
            out.append(ids[i * window : (i + 1) * window])
    return out


def logprobs(model, ids: list[int]) -> mx.array:
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [L, vocab]


def score(model, wins, ref_dir: Path | None) -> dict:
    """Perplexity; with ``ref_dir`` also mean KL against the saved reference log-probs."""
    nll, kl, n = 0.0, 0.0, 0
    for i, ids in enumerate(wins):
        lp = logprobs(model, ids)
        target = mx.array(ids[1:])
        nll += float(-mx.take_along_axis(lp[:-1], target[:, None], axis=-1).sum())
        if ref_dir is not None:
            ref = mx.array(np.load(ref_dir / f"{i}.npy"))
            kl += float((mx.exp(ref) * (ref - lp[:-1])).sum())
        n += len(ids) - 1
    return {"ppl": math.exp(nll / n), "kl": kl / n if ref_dir is not None else 0.0, "tokens": n}


def bits_per_weight(folder: Path) -> float:
    from mlxllm.quant import bits_per_weight as bpw

    weights = {}
    for f in folder.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    q = json.loads((folder / "config.json").read_text()).get("quantization", {})
    return bpw(weights, q)


def evaluate(folder: Path, wins, ref_dir) -> dict:
    from mlxllm import load
    from mlxllm.quant import dequantize_model

    model, _ = load(folder, dtype=mx.float32)
    dequantize_model(model)
    mx.eval(model.parameters())
    res = score(model, wins, ref_dir)
    del model
    mx.clear_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=FIXTURES / "qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2, help="windows per text")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    args = ap.parse_args(argv)

    from mlx_lm import convert as mlx_lm_convert

    from mlxllm import load
    from mlxllm.convert import convert

    work = Path(tempfile.mkdtemp(prefix="mlxllm-quality-"))
    try:
        ref_model, tok = load(args.model, dtype=mx.float32)
        wins = windows(tok, args.window, args.windows)
        print(f"{len(wins)} windows of {args.window} tokens from {EVAL_DIR}")
        ref_dir = work / "ref"
        ref_dir.mkdir()
        t = time.perf_counter()
        nll, n = 0.0, 0
        for i, ids in enumerate(wins):
            lp = logprobs(ref_model, ids)
            np.save(ref_dir / f"{i}.npy", np.array(lp[:-1]))
            nll += float(-mx.take_along_axis(lp[:-1], mx.array(ids[1:])[:, None], axis=-1).sum())
            n += len(ids) - 1
        del ref_model
        ref = {"ppl": math.exp(nll / n), "kl": 0.0, "tokens": n, "bpw": 16.0}
        dt = time.perf_counter() - t
        print(f"reference (float16 as stored): ppl {ref['ppl']:.4f} ({dt:.0f} s)")
        rows = {}
        for name in args.settings:
            ours_kw, theirs_kw = SETTINGS[name]
            for tool in ("mlxllm", "mlx-lm"):
                out = work / f"{tool}-{name.replace(' ', '_').replace('/', '-')}"
                t = time.perf_counter()
                if tool == "mlxllm":
                    convert(args.model, out, progress=False, **ours_kw)
                else:
                    mlx_lm_convert(str(args.model), str(out), quantize=True, **theirs_kw)
                res = evaluate(out, wins, ref_dir)
                res["bpw"] = bits_per_weight(out)
                res["ppl_ratio"] = res["ppl"] / ref["ppl"]
                rows[f"{tool} | {name}"] = res
                print(
                    f"{tool:7s} {name:10s} ppl {res['ppl']:.4f} (x{res['ppl_ratio']:.4f}) "
                    f"KL {res['kl']:.5f} bpw {res['bpw']:.2f} ({time.perf_counter() - t:.0f} s)"
                )
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "| setting | tool | bits/weight | perplexity | ppl ratio | mean KL |",
        "|---|---|---|---|---|---|",
        f"| float16 reference | - | 16 | {ref['ppl']:.4f} | 1.0000 | 0 |",
    ]
    for key, r in rows.items():
        tool, name = key.split(" | ")
        lines.append(
            f"| {name} | {tool} | {r['bpw']:.2f} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f} | "
            f"{r['kl']:.5f} |"
        )
    print("\n" + "\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"reference": ref, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
