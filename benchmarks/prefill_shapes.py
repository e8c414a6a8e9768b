"""Probe: what a prefill call of a shape never seen before costs, against the same call again.

On CUDA, MLX runs a prefill's attention (more than one query, bfloat16/float16) through cuDNN,
whose graph it builds once per exact set of shapes and strides (``q``, ``k``, ``v``, the mask)
and keeps in a per-thread LRU cache. A server sees a new prompt length on nearly every request,
so this probe measures, for the shapes a serving engine makes (``G`` rows of ``n`` new queries
after ``offset`` cached positions, left-padded rows masked), the first call of each shape and a
repeat of it, from a fresh cache each time.

```sh
python benchmarks/prefill_shapes.py --model qwen2.5-7b                # default attention
MLX_CUDA_USE_CUDNN_SDPA=0 python benchmarks/prefill_shapes.py --model qwen2.5-7b
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [  # (rows, new queries, cached positions, left padding of row 0)
    (1, 47, 0, 0), (1, 47, 0, 0), (1, 52, 0, 0), (3, 49, 0, 2), (4, 49, 0, 3),
    (8, 49, 0, 5), (1, 64, 0, 0), (4, 64, 0, 0), (1, 100, 3500, 0), (1, 131, 3600, 0),
    (1, 128, 3584, 0), (1, 128, 3584, 0), (1, 2048, 0, 0), (1, 2048, 4096, 0),
]  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import mlx.core as mx
    from engine import _load

    from mlxllm.cache.batch import batch_caches

    model = _load("mlxllm", args.model, args.layers, getattr(mx, args.dtype), 0)
    rng = __import__("numpy").random.default_rng(0)

    def caches_for(G, offset, pad):
        rows = []
        for b in range(G):
            c = model.make_cache()
            n = offset if b else offset - pad
            if n > 0:
                model(mx.array(rng.integers(0, 1000, (1, n)), dtype=mx.int32), cache=c)
            rows.append(c)
        mx.eval([x.state for r in rows for x in r])
        return batch_caches(rows) if G > 1 or pad else rows[0]

    def call(G, n, offset, pad):
        caches = caches_for(G, offset, pad)
        x = mx.array(rng.integers(0, 1000, (G, n)), dtype=mx.int32)
        mx.synchronize()
        t = time.perf_counter()
        model(x, cache=caches)
        mx.eval([c.state for c in caches])  # as the engine's prefill: no logits
        return 1e3 * (time.perf_counter() - t)

    call(1, 16, 0, 0)  # the first call's own start-up
    out = []
    print(f"MLX_CUDA_USE_CUDNN_SDPA={os.environ.get('MLX_CUDA_USE_CUDNN_SDPA', '(unset)')}")
    print("| rows | queries | offset | first ms | again ms |\n|---|---|---|---|---|")
    for G, n, offset, pad in CASES:
        first = call(G, n, offset, pad)
        again = min(call(G, n, offset, pad) for _ in range(2))
        out.append(dict(rows=G, queries=n, offset=offset, pad=pad, first_ms=first, again_ms=again))
        print(f"| {G} | {n} | {offset} | {first:.1f} | {again:.1f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
