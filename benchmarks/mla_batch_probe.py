"""Probe (GPU): batched absorbed-MLA decode attention at DeepSeek-V2-Lite widths, several forms.

python benchmarks/mla_batch_probe.py --batch 16 --context 8192
"""

import argparse
import functools
import time

import mlx.core as mx

from mlxllm.kernels import mla_decode
from mlxllm.layers.mla import shared_kv_attention


def timeit(f, n=50):
    for _ in range(3):
        mx.eval(f())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    mx.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, default=8192)
    a = ap.parse_args()
    H, r, dr, v = 16, 512, 64, 128
    for B in a.batch:
        S = a.context
        q = mx.random.normal((B, H, 1, r + dr)).astype(mx.bfloat16)
        kv = mx.random.normal((B, 1, S, r + dr)).astype(mx.bfloat16)
        w_uv = (mx.random.normal((H, v, r)) * 0.05).astype(mx.bfloat16)
        left = mx.array([i * 7 for i in range(B)])
        mask = (mx.arange(S)[None] >= left[:, None])[:, None, None, :]
        mx.eval(q, kv, w_uv, mask)
        forms = {
            "sdpa": lambda q, kv, w, m: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.1),
            "sdpa+mask": lambda q, kv, w, m: mx.fast.scaled_dot_product_attention(
                q, kv, kv, scale=0.1, mask=m
            ),
            "gemm+mask": lambda q, kv, w, m: shared_kv_attention(q, kv, kv, 0.1, m),
            "flash(no mask)": lambda q, kv, w, m: mla_decode.latent_attention(q, kv, 0.1, w),
        }
        args = (q, kv, w_uv, mask)
        row = {k: timeit(functools.partial(f, *args)) for k, f in forms.items()}
        gb = kv.nbytes / 1e9
        print(
            f"B={B} S={S}: "
            + ", ".join(f"{k} {t:.3f} ms" for k, t in row.items())
            + f" (latent {gb:.2f} GB per layer)"
        )


if __name__ == "__main__":
    main()
