"""MoE / MLA decode speed: mlxllm against mlx-lm on random-weight real configs, side by side.

For each config (DeepSeek-V2-Lite, Qwen1.5-MoE-A2.7B by default) and each context length, each
runtime runs in its own subprocess: it builds the model from the config with random weights,
fills its KV cache to the context length with random contents (the values do not change the
speed; this skips a long prefill), then times greedy decode two ways: "sync" (model call,
argmax, ``mx.eval`` per token: the same loop for both) and "generate" (each tool's own
``generate_step``, which queues the next step with ``mx.async_eval``: what users get). It
reports both tok/s, the KV-cache bytes at that context and peak memory, and the mlxllm / mlx-lm
ratios (medians over ``--repeats`` alternating runs). mlxllm's routers stay float32 as its
loader leaves them; everything else is in ``--dtype``.

On the CPU use fewer layers (``--layers 2``) and shorter contexts; on a GPU run the full
configs::

    python benchmarks/moe_mla.py --layers 2 --contexts 512 8192 --gen 8      # CPU
    python benchmarks/moe_mla.py --contexts 8192 32768 131072 --gen 64 --repeats 2   # GPU

``--kernels`` also counts CUDA kernels and GPU-busy time per token (CUPTI via torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "moe_mla.json"

# Published config.json values (random weights are generated from them).
CONFIGS = {
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    # DeepSeek-V3 / R1 (config.json of deepseek-ai/DeepSeek-V3; cut with --layers: the first
    # three layers are dense, the rest 256-expert MoE)
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
    },
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 8192,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    # dense, for absolute GPU decode figures next to mlx-lm (not an MoE)
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}


def _build(tool: str, config: dict):
    import mlx.core as mx

    if tool == "mlxllm":
        from mlxllm.models import build_model

        model = build_model(config)
        caches = model.make_cache()
    else:
        import importlib

        mod = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model = mod.Model(mod.ModelArgs.from_dict(config))
        caches = model.make_cache() if hasattr(model, "make_cache") else None
        if caches is None:
            from mlx_lm.models.cache import make_prompt_cache

            caches = make_prompt_cache(model)
    return model, caches, mx


def _fill(caches, context: int, mx) -> None:
    """Grow every layer cache to ``context`` positions of random contents."""
    for c in caches:
        if hasattr(c, "rank"):  # mlxllm LatentCache: one [c_kv | k_pe] buffer
            B, _, _, width = c.joint.shape
            n = context - c.offset
            lat = mx.random.normal((B, 1, n, width)).astype(c.joint.dtype)
            c.update_and_fetch(lat[..., : c.rank], lat[..., c.rank :])
        else:  # plain K/V caches (mlxllm and mlx-lm)
            k, v = [a for a in c.state if isinstance(a, mx.array)][:2]
            n = context - c.offset
            shape_k = (*k.shape[:2], n, k.shape[3])
            shape_v = (*v.shape[:2], n, v.shape[3])
            c.update_and_fetch(
                mx.random.normal(shape_k).astype(k.dtype), mx.random.normal(shape_v).astype(v.dtype)
            )
        mx.eval(c.state)


def _own_loop(tool: str, model, caches, gen: int, mx) -> float:
    """Decode tok/s of the tool's own generation loop (``generate_step``: the next step is
    queued with ``mx.async_eval`` while the current token is read), first token excluded."""
    if tool == "mlxllm":
        from mlxllm.generation.step import generate_step

        tokens = generate_step(model, [2], caches, max_tokens=gen + 1)
    else:
        import importlib

        step = importlib.import_module("mlx_lm.generate").generate_step
        greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
        tokens = step(mx.array([2]), model, prompt_cache=caches, max_tokens=gen + 1, sampler=greedy)
    t0 = None
    for i, _ in enumerate(tokens):
        if i == 0:
            t0 = time.perf_counter()
    return gen / (time.perf_counter() - t0)


def _kernel_profile(tool: str, model, caches, mx, steps: int = 4) -> dict:
    """CUDA kernels and GPU-busy time per token of the tool's own loop, counted by CUPTI through
    ``torch.profiler`` in this process (it sees MLX's kernels too). Empty without torch + CUDA.

    On MLX's CUDA backend issuing a kernel costs ~10 us whatever it computes, so decode speed
    follows the number of kernels per token more than the bytes read.
    """
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _own_loop(tool, model, caches, steps, mx)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    n = steps + 1  # the loop also runs the step that yields the first token
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        t = by_name.setdefault(e.name, [0.0, 0])
        t[0] += getattr(e, "device_time", None) or e.cuda_time
        t[1] += 1
    busy_us = sum(t[0] for t in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "kernels_per_token": len(kernels) / n,
        "gpu_busy_ms": busy_us / n / 1e3,
        # where the GPU time goes: (kernel, us per token, launches per token)
        "top_kernels": [(k[:90], round(t / n, 1), round(c / n, 1)) for k, (t, c) in top],
    }


def worker(
    tool: str,
    name: str,
    layers: int | None,
    context: int,
    gen: int,
    dtype: str,
    kernels: bool = False,
) -> dict:
    config = dict(CONFIGS[name])
    if layers:
        config["num_hidden_layers"] = layers
    model, caches, mx = _build(tool, config)
    model.set_dtype(getattr(mx, dtype))
    if tool == "mlxllm":  # as mlxllm's loader leaves them: routers stay float32
        from mlx.utils import tree_flatten, tree_unflatten

        from mlxllm.loader import cast_weights

        params = dict(tree_flatten(model.parameters()))
        model.update(tree_unflatten(list(cast_weights(params, getattr(mx, dtype)).items())))
    mx.eval(model.parameters())
    y = mx.array([[1]])
    mx.eval(model(y, cache=caches))  # one real step creates every cache with its real shapes
    _fill(caches, context, mx)
    # bytes per cached position x context (buffers may hold unused tail capacity)
    arrays = [a for c in caches for a in c.state if isinstance(a, mx.array)]
    kv_bytes = int(sum(a.nbytes / a.shape[-2] for a in arrays) * context)
    y = mx.array([[2]])
    for _ in range(8):  # warm-up (kernel compilation, allocator)
        y = mx.argmax(model(y, cache=caches)[:, -1:], axis=-1)
        mx.eval(y)
    mx.reset_peak_memory()
    t = time.perf_counter()
    for _ in range(gen):
        y = mx.argmax(model(y, cache=caches)[:, -1:], axis=-1)
        mx.eval(y)
    dt = time.perf_counter() - t
    for c in caches:
        c.trim(gen)
    gen_tps = _own_loop(tool, model, caches, gen, mx)
    prof = _kernel_profile(tool, model, caches, mx) if kernels else {}
    return {
        **prof,
        "decode_tps": gen / dt,
        "generate_tps": gen_tps,
        "kv_bytes": kv_bytes,
        "kv_bytes_per_token": kv_bytes / context,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "device": str(mx.default_device()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", default=["deepseek-v2-lite", "qwen1.5-moe-a2.7b"])
    ap.add_argument("--contexts", nargs="*", type=int, default=[512, 8192])
    ap.add_argument("--layers", type=int, default=None, help="cut every config to N layers")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=1, help="alternate runs; report the median")
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="also count CUDA kernels and GPU-busy ms per token (needs torch with CUDA)",
    )
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        tool, name, layers, context, dtype = args.worker
        res = worker(tool, name, int(layers) or None, int(context), args.gen, dtype, args.kernels)
        print(json.dumps(res))
        return
    if args.dtype is None:
        import mlx.core as mx

        args.dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    rows = []
    for name in args.configs:
        for ctx in args.contexts:
            row = {"config": name, "context": ctx}
            runs = {"mlxllm": [], "mlx-lm": []}
            for _ in range(args.repeats):  # alternate the tools so drift hits both alike
                for tool in runs:
                    cmd = [sys.executable, __file__, "--gen", str(args.gen)]
                    cmd += ["--kernels"] if args.kernels else []
                    cmd += ["--worker", tool, name]
                    cmd += [str(args.layers or 0), str(ctx), args.dtype]
                    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                    if r.returncode != 0:
                        runs[tool].append({"error": r.stderr.strip().splitlines()[-1][:200]})
                    else:
                        runs[tool].append(json.loads(r.stdout.strip().splitlines()[-1]))
            for tool, rs in runs.items():
                ok = [x for x in rs if "error" not in x]
                row[tool] = dict(ok[0]) if ok else rs[0]
                for k in ("decode_tps", "generate_tps"):  # medians over the alternating runs
                    if ok:
                        vals = sorted(x[k] for x in ok)
                        row[tool][k] = vals[len(vals) // 2]
                        row[tool][f"all_{k}"] = [round(v, 2) for v in vals]
            a, b = row["mlxllm"], row["mlx-lm"]
            if "error" not in a and "error" not in b:
                row["decode_ratio"] = a["decode_tps"] / b["decode_tps"]
                row["generate_ratio"] = a["generate_tps"] / b["generate_tps"]
                row["kv_ratio"] = a["kv_bytes"] / b["kv_bytes"]
            rows.append(row)
            print(json.dumps(row))
    lines = [
        f"layers: {args.layers or 'full'}, dtype {args.dtype}, {args.gen} decode steps, "
        f"median of {args.repeats} alternating runs",
        "sync: model call + mx.eval per token; generate: each tool's own generate_step "
        "(next step queued with async_eval)",
        "| config | context | sync mlxllm | sync mlx-lm | ratio | generate mlxllm | "
        "generate mlx-lm | ratio | mlxllm KV MB | mlx-lm KV MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["mlxllm"], r["mlx-lm"]

        def f(x, k, scale=1.0, spec=".2f"):
            return "error" if "error" in x else format(x[k] / scale, spec)

        ratio = f"{r['decode_ratio']:.2f}" if "decode_ratio" in r else "-"
        gratio = f"{r['generate_ratio']:.2f}" if "generate_ratio" in r else "-"
        lines.append(
            f"| {r['config']} | {r['context']} | {f(a, 'decode_tps')} | {f(b, 'decode_tps')} | "
            f"{ratio} | {f(a, 'generate_tps')} | {f(b, 'generate_tps')} | {gratio} | "
            f"{f(a, 'kv_bytes', 1e6, '.1f')} | {f(b, 'kv_bytes', 1e6, '.1f')} |"
        )
    counted = [r for r in rows if all("kernels_per_token" in r[t] for t in ("mlxllm", "mlx-lm"))]
    if counted:
        lines += [
            "",
            "| config | context | kernels/token mlxllm | mlx-lm | GPU-busy ms/token mlxllm "
            "| mlx-lm |",
            "|---|---|---|---|---|---|",
        ]
        for r in counted:
            a, b = r["mlxllm"], r["mlx-lm"]
            lines.append(
                f"| {r['config']} | {r['context']} | {a['kernels_per_token']:.0f} | "
                f"{b['kernels_per_token']:.0f} | {a['gpu_busy_ms']:.2f} | {b['gpu_busy_ms']:.2f} |"
            )
        for r in counted:
            for tool in ("mlxllm", "mlx-lm"):
                lines += ["", f"{tool}, {r['config']} at {r['context']}: us/token, launches/token"]
                lines += [f"  {us:8.1f} {c:6.1f}  {k}" for k, us, c in r[tool]["top_kernels"]]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
