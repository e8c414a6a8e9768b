"""MoE correctness at full width: mlxllm against mlx-lm on one random-weight DeepSeek-V2-Lite.

Both runtimes get the same checkpoint tensors (Hugging Face layout: one tensor per expert, as the
Hub checkpoint stores them; bfloat16, drawn from a seed) and load them through their own code:
mlxllm through ``loader.model_from_weights`` (what ``load_model`` does after reading the files),
mlx-lm through its model's ``sanitize`` and ``load_weights``. The prompt of 2,048 random ids goes
in three chunks that take every prefill path of mlxllm's V2-Lite: 1,536 tokens (expanded MLA in
query chunks, sorted experts), 464 (expanded, one chunk, reading the cache), 48 (absorbed,
sorted experts); then 32 decode steps, teacher-forced with the reference's greedy tokens so that
every run sees the same inputs.

The reference is mlx-lm in float32; mlx-lm in bfloat16 against it is the yardstick (what
rounding alone costs). Reported per run: the relative L2 error of the logits (last 16 positions
of each prefill chunk, every decode step; mean and max over those rows) and how many greedy
choices match the reference's. float32 matmuls run without TF32 (``MLX_ENABLE_TF32=0``, set
here before MLX loads), or float32 would not be float32 on CUDA.

    python benchmarks/moe_parity.py                      # full V2-Lite (27 layers), GPU
    python benchmarks/moe_parity.py --layers 4           # the GPU test's mid-size model
    python benchmarks/moe_parity.py --with-defect        # adds mlxllm with the pre-fix rows

``--with-defect`` adds a row for mlxllm with the expert rows laid out as before the fix
(``x[order // k][:, None]``, see ``layers/moe.py``): what MLX-CUDA 0.32.4 computed wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # read once by MLX, at its first matmul

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CHUNKS = ((0, 1536), (1536, 2000), (2000, 2048))
DECODE_STEPS = 32
ROWS_PER_CHUNK = 16  # logits kept from the end of each prefill chunk


def v2_lite_config(layers: int | None = None) -> dict:
    from moe_mla import CONFIGS

    config = dict(CONFIGS["deepseek-v2-lite"])
    if layers:
        config["num_hidden_layers"] = layers
    return config


def checkpoint_tensors(config: dict, seed: int = 0) -> dict:
    """Random bfloat16 tensors named and shaped as the Hugging Face checkpoint of ``config``
    (one tensor per expert). Linear weights ~ N(0, 1/fan_in), so activations keep their scale
    through the layers; RMSNorm weights ~ 1 + N(0, 0.1^2); embeddings ~ N(0, 1). The same seed
    gives the same tensors on the same device."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxllm.models import build_model

    # the parameter names are the checkpoint's, except the stacked experts; shapes only (the
    # model's own random init stays lazy and is never computed)
    shapes = {k: v.shape for k, v in tree_flatten(build_model(config).parameters())}
    out = {}
    for i, name in enumerate(sorted(shapes)):
        shape, key = shapes[name], mx.random.key(seed * 1_000_003 + i)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * mx.random.normal(shape, key=key)
        elif "embed_tokens" in name:
            w = mx.random.normal(shape, key=key)
        else:
            w = mx.random.normal(shape, key=key) * shape[-1] ** -0.5
        w = w.astype(mx.bfloat16)
        mx.eval(w)  # one tensor at a time: no float32 copy of the whole model at once
        if ".mlp.experts." in name:  # [n_experts, out, in] -> experts.{e}.{proj}.weight
            prefix, proj = name.split(".mlp.experts.")
            for e in range(shape[0]):
                out[f"{prefix}.mlp.experts.{e}.{proj}"] = w[e]
        else:
            out[name] = w
    return out


def build(tool: str, config: dict, dtype: str, seed: int):
    """(model, cache) of ``tool`` with the seed's checkpoint tensors in ``dtype``."""
    import mlx.core as mx

    # the tensors are passed on, never held here: at full size their bfloat16 (31 GB) and the
    # float32 model (63 GB) are what the GPU holds at once
    if tool == "mlxllm":
        from mlxllm.loader import model_from_weights

        model = model_from_weights(config, checkpoint_tensors(config, seed), getattr(mx, dtype))
        return model, model.make_cache()
    from mlx_lm.models import cache as mlx_lm_cache
    from mlx_lm.models import deepseek_v2

    model = deepseek_v2.Model(deepseek_v2.ModelArgs.from_dict(config))
    weights = model.sanitize(checkpoint_tensors(config, seed))
    model.load_weights([(k, v.astype(getattr(mx, dtype))) for k, v in weights.items()])
    model.eval()
    mx.eval(model.parameters())
    return model, mlx_lm_cache.make_prompt_cache(model)


def run(tool: str, config: dict, dtype: str, ids: list[int], forced: list[int] | None, seed=0):
    """Logits rows (float32 numpy ``[rows, vocab]``) and greedy choices of one runtime; decode
    steps are fed ``forced`` (the reference's tokens) when given, else its own choices."""
    import mlx.core as mx
    import numpy as np

    model, cache = build(tool, config, dtype, seed)
    rows, choices = [], []
    for a, b in CHUNKS:
        out = model(mx.array([ids[a:b]]), cache=cache)[0, -ROWS_PER_CHUNK:].astype(mx.float32)
        rows.append(np.array(out))
    token = int(rows[-1][-1].argmax())
    for i in range(DECODE_STEPS):
        feed = forced[i] if forced is not None else token
        choices.append(token)
        out = model(mx.array([[feed]]), cache=cache)[0, -1].astype(mx.float32)
        rows.append(np.array(out)[None])
        token = int(rows[-1][0].argmax())
    del model, cache
    mx.clear_cache()
    return np.concatenate(rows), choices


def old_rows_layout():
    """Context in which mlxllm's experts get their rows as before the fix (``[:, None]``)."""
    import contextlib

    import mlx.core as mx

    from mlxllm.layers import moe

    @contextlib.contextmanager
    def patched():
        keep = moe._sort_by_expert

        def before_fix(x, indices):
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            return x[order // k][:, None], flat[order], mx.argsort(order)

        moe._sort_by_expert = before_fix
        try:
            yield
        finally:
            moe._sort_by_expert = keep

    return patched()


def compare(layers: int | None = None, seed: int = 0, with_defect: bool = False) -> dict:
    """Every run against mlx-lm float32: ``{name: {rel_l2_mean, rel_l2_max, greedy_match}}``."""
    import contextlib

    import numpy as np

    config = v2_lite_config(layers)
    ids = np.random.default_rng(seed).integers(0, config["vocab_size"], CHUNKS[-1][1]).tolist()
    ref, ref_choices = run("mlx-lm", config, "float32", ids, None, seed)
    ref_greedy = ref.argmax(axis=-1)  # its choice after each kept row
    runs = [("mlx-lm bfloat16", "mlx-lm", "bfloat16", None)]
    runs += [("mlxllm float32", "mlxllm", "float32", None)]
    runs += [("mlxllm bfloat16", "mlxllm", "bfloat16", None)]
    if with_defect:
        runs += [("mlxllm float32, rows as before the fix", "mlxllm", "float32", old_rows_layout)]
    res = {"config": {"layers": config["num_hidden_layers"], "prompt": len(ids)}}
    for name, tool, dtype, ctx in runs:
        with ctx() if ctx else contextlib.nullcontext():
            got, _ = run(tool, config, dtype, ids, ref_choices, seed)
        err = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        res[name] = {
            "rel_l2_mean": float(err.mean()),
            "rel_l2_max": float(err.max()),
            "rel_l2_prefill_max": float(err[: len(CHUNKS) * ROWS_PER_CHUNK].max()),
            "rel_l2_decode_max": float(err[len(CHUNKS) * ROWS_PER_CHUNK :].max()),
            "greedy_match": int((got.argmax(axis=-1) == ref_greedy).sum()),
            "rows": len(ref_greedy),
        }
        print(name, json.dumps(res[name]), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="cut V2-Lite to N layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-defect", action="store_true", help="add the pre-fix rows layout")
    args = ap.parse_args(argv)
    import mlx.core as mx

    res = compare(args.layers, args.seed, args.with_defect)
    cfg = res.pop("config")
    print(
        f"\nDeepSeek-V2-Lite, {cfg['layers']} layers, random bf16 weights, {cfg['prompt']}-token "
        f"prompt + {DECODE_STEPS} decode steps, {mx.default_device()}, mlx {mx.__version__}; "
        "against mlx-lm float32"
    )
    print("| run | rel. L2 mean | max (prefill) | max (decode) | greedy = reference |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(
            f"| {name} | {r['rel_l2_mean']:.2e} | {r['rel_l2_prefill_max']:.2e} | "
            f"{r['rel_l2_decode_max']:.2e} | {r['greedy_match']}/{r['rows']} |"
        )


if __name__ == "__main__":
    main()
