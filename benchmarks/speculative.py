"""Speculative decoding benchmark: what verifying costs, what acceptance buys, and mlxllm's
speculation against mlx-lm's on the same model pair.

Scenarios (``--scenario``, default all that the arguments allow):

- ``verify``: the cost of one model call over ``L`` new tokens (L = 1 .. ``--max-draft`` + 1)
  after ``--context`` cached positions, relative to one token: the ceiling of the speedup is
  ``(accepted + 1) / cost(k + 1)``. mlxllm and mlx-lm on the same model (a checkpoint folder,
  or a config of ``moe_mla.CONFIGS`` with the same random weights, ``--layers`` to cut it),
  each call timed after a warm-up, the cache trimmed back after each, median of ``--calls``.
- ``forced``: mlxllm's speculative decode tok/s with an oracle drafter that proposes the
  model's own greedy token with probability ``r`` (else a wrong one) at no cost, for each r of
  ``--rates``, against plain decoding: the speedup a drafter of that acceptance could give at
  best, here, on this model.
- ``pair`` (``--draft FOLDER`` or ``--draft-bits B``: the model's own B-bit copy): decode tok/s
  of plain and speculative greedy decoding, mlxllm (``stream_generate(drafter=DraftModel)``)
  and mlx-lm (``stream_generate(draft_model=, num_draft_tokens=)``) alternating over
  ``--repeats``; the acceptance of each; both outputs checked against their plain output.
- ``mtp`` (``--mtp-head FILE`` from ``mlxllm finetune --mtp``): acceptance by draft position
  and tok/s with and without, mlxllm only (no peer runs trained MTP heads; mlx-lm drops
  DeepSeek's MTP weights).

Prompts: the starts of Python standard-library modules (``--prompt-tokens`` tokens each), so
that code-trained models draft well; never the eval texts. Greedy, ``--gen`` tokens, eos
ignored. Results: ``benchmarks/results/speculative.json``::

    python benchmarks/speculative.py --scenario pair mtp --mtp-head head.safetensors   # CPU
    python benchmarks/speculative.py --model deepseek-v3 --layers 4 --scenario verify forced
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, compare, table_row

RESULTS = REPO / "benchmarks" / "results" / "speculative.json"
MODULES = ("textwrap", "fractions", "calendar", "heapq", "bisect", "shlex")


def prompts(tokenizer, n: int, count: int) -> list[list[int]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in MODULES[:count]:
        ids = tokenizer.encode((lib / f"{name}.py").read_text())
        out.append(ids[:n])
    return out


def load_pair(model: str, layers, dtype_name: str):
    """(mlxllm model, mlx-lm model or None, tokenizer or None, vocab)."""
    import mlx.core as mx
    from engine import _config, _load

    dtype = getattr(mx, dtype_name)
    mine = _load("mlxllm", model, layers, dtype, 0)
    theirs = _load("mlx-lm", model, layers, dtype, 0)
    tok = None
    if Path(model).expanduser().is_dir():
        from mlxllm.tokenizer import load_tokenizer

        tok = load_tokenizer(Path(model).expanduser())
    return mine, theirs, tok, _config(model, layers)["vocab_size"]


def _time_call(fn, n: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def verify(args, mine, theirs, vocab) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    out = {}
    rng = np.random.default_rng(0)
    for C in args.context:
        ctx = mx.array(rng.integers(0, vocab, (1, C)))
        caches = {"mlxllm": mine.make_cache(), "mlx-lm": make_prompt_cache(theirs)}
        nets = {"mlxllm": mine, "mlx-lm": theirs}
        for tool, net in nets.items():
            for s in range(0, C, 512):
                net(ctx[:, s : s + 512], cache=caches[tool])
                mx.eval([c.state for c in caches[tool]])
        rows = {t: [] for t in nets}
        for L in range(1, args.max_draft + 2):
            x = mx.array(rng.integers(0, vocab, (1, L)))
            for tool in list(nets) if L % 2 else list(nets)[::-1]:
                net, cache = nets[tool], caches[tool]

                def call(net=net, cache=cache, x=x, L=L):
                    y = net(x, cache=cache)
                    for c in cache:
                        c.trim(L)
                    return y

                rows[tool].append(_time_call(call, args.calls))
        out[C] = {t: [r / v[0] for r in v] for t, v in rows.items()} | {"seconds": rows}
        line = " | ".join(f"L={L + 1}: {out[C]['mlxllm'][L]:.2f} ({out[C]['mlx-lm'][L]:.2f})"
                          for L in range(len(rows["mlxllm"])))  # fmt: skip
        print(
            f"verify, context {C}: cost vs one token, mlxllm (mlx-lm): {line}; one token "
            f"{rows['mlxllm'][0] * 1e3:.2f} ms ({rows['mlx-lm'][0] * 1e3:.2f})",
            flush=True,
        )
    return out


class Oracle:
    """A drafter that knows the model's greedy continuation: the right token with
    probability ``rate`` at each position (after a wrong one, all later drafts are wrong)."""

    def __init__(self, truth: list[int], rate: float, vocab: int, seed: int = 0):
        import numpy as np

        self.truth, self.rate, self.vocab = truth, rate, vocab
        self.rng = np.random.default_rng(seed)
        self.pos = 0  # committed generated tokens

    offset = 0

    def trim_to(self, n):
        pass

    def begin(self, ids):
        self.pos = 0

    def prefill(self, ids, start, end, hidden):
        pass

    def state(self):
        return []

    def draft(self, k, probs=None, key=None):
        import mlx.core as mx

        out, right = [], True
        for i in range(k):
            t = self.truth[min(self.pos + i, len(self.truth) - 1)]
            right = right and self.rng.random() < self.rate
            out.append(t if right else (t + 1) % self.vocab)
        return mx.array(out, dtype=mx.int32), None

    def commit(self, k, a, hidden, tokens):
        self.pos += len(tokens)


def _decode_tps(run, gen: int) -> float:
    first, n = None, 0
    for _ in run():
        n += 1
        if n == 1:
            first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0


def forced(args, mine, vocab) -> dict:
    """Round time of speculative decoding with ``k`` drafts (measured with drafts that are
    never kept: one token per round), and the tok/s a drafter of per-draft acceptance ``r``
    would give with it: ``(1 + r + ... + r^k) / round time`` (a free drafter; the ceiling).
    An oracle of the model's plain greedy tokens cannot force acceptance on random weights:
    their near-flat logits flip between a one-token and a (k+1)-token call."""
    import mlx.core as mx
    import numpy as np

    from mlxllm.generation.step import generate_step
    from mlxllm.speculative import speculative_generate_step

    prompt = np.random.default_rng(1).integers(0, vocab, args.prompt_tokens).tolist()
    truth = list(generate_step(mine, prompt, mine.make_cache(), max_tokens=args.gen + 8))

    def spec():  # the oracle at rate 0: every draft wrong
        return speculative_generate_step(mine, Oracle(truth, 0.0, vocab), prompt,
                                         mine.make_cache(), num_draft=args.num_draft,
                                         max_tokens=args.gen)  # fmt: skip

    for _ in spec():  # untimed: the first pass compiles (CUDA: several-query attention)
        pass
    out = {"plain": [], "round_s": []}
    for _ in range(args.repeats):
        out["plain"].append(_decode_tps(lambda: generate_step(
            mine, prompt, mine.make_cache(), max_tokens=args.gen), args.gen))  # fmt: skip
        out["round_s"].append(1 / _decode_tps(spec, args.gen))
    base, T = statistics.median(out["plain"]), statistics.median(out["round_s"])
    k = args.num_draft
    out["rates"] = {r: sum(r**i for i in range(k + 1)) / T for r in args.rates}
    cells = ", ".join(f"{r:.0%}: {v:.1f} ({v / base:.2f}x)" for r, v in out["rates"].items())
    print(
        f"forced, k={k}: plain {base:.1f} tok/s ({1e3 / base:.2f} ms/token); speculative round "
        f"{T * 1e3:.2f} ms; tok/s at acceptance {cells}",
        flush=True,
    )
    mx.clear_cache()
    return out


def pair(args, mine, theirs, tok) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.generate import stream_generate as lm_stream

    from mlxllm.generation.step import generate_step
    from mlxllm.quant import make_predicate, quantize_model
    from mlxllm.speculative import DraftModel, SpecStats, speculative_generate_step

    if args.draft:
        from engine import _load

        d_mine = _load("mlxllm", args.draft, None, getattr(mx, args.dtype), 0)
        d_theirs = _load("mlx-lm", args.draft, None, getattr(mx, args.dtype), 0)
    else:
        d_mine = type(mine)(mine.config)
        d_mine.update(mine.parameters())
        quantize_model(d_mine, make_predicate(bits=args.draft_bits, group_size=64))
        import copy

        d_theirs = copy.deepcopy(theirs)
        nn.quantize(d_theirs, group_size=64, bits=args.draft_bits)
    ps = prompts(tok, args.prompt_tokens, args.prompts)
    lm_tok = _lm_tokenizer(args.model)
    res = {k: [] for k in ("mlxllm plain", "mlxllm spec", "mlx-lm plain", "mlx-lm spec")}
    acc = {"mlxllm": [], "mlx-lm": []}
    same = {"mlxllm": 0, "mlx-lm": 0}
    for rep in range(args.repeats):
        order = ("mlxllm", "mlx-lm") if rep % 2 == 0 else ("mlx-lm", "mlxllm")
        for tool in order:
            for p in ps:
                if tool == "mlxllm":
                    plain = list(generate_step(mine, p, mine.make_cache(), max_tokens=args.gen))
                    res["mlxllm plain"].append(_decode_tps(lambda p=p: generate_step(
                        mine, p, mine.make_cache(), max_tokens=args.gen), args.gen))  # fmt: skip
                    st = SpecStats()
                    spec = []

                    def run(p=p, st=st, spec=spec):
                        for t in speculative_generate_step(
                            mine,
                            DraftModel(d_mine),
                            p,
                            mine.make_cache(),
                            num_draft=args.num_draft,
                            max_tokens=args.gen,
                            stats=st,
                        ):
                            spec.append(t)
                            yield t

                    res["mlxllm spec"].append(_decode_tps(run, args.gen))
                    acc["mlxllm"].append(sum(st.accepted) / max(1, sum(st.drafted)))
                    same["mlxllm"] += spec == plain
                else:
                    kw = {"max_tokens": args.gen}

                    def lm(p=p, kw=kw, **extra):
                        return (r.token for r in lm_stream(theirs, lm_tok, p, **kw, **extra))

                    plain = list(lm(p))
                    res["mlx-lm plain"].append(_decode_tps(lambda p=p: lm(p), args.gen))
                    drafted = []

                    def run(p=p, drafted=drafted, kw=kw):
                        for r in lm_stream(
                            theirs,
                            lm_tok,
                            p,
                            draft_model=d_theirs,
                            num_draft_tokens=args.num_draft,
                            **kw,
                        ):
                            drafted.append((r.token, r.from_draft))
                            yield r.token

                    res["mlx-lm spec"].append(_decode_tps(run, args.gen))
                    acc["mlx-lm"].append(sum(f for _, f in drafted) / max(1, len(drafted)))
                    same["mlx-lm"] += [t for t, _ in drafted] == plain
    rows = {"spec tok/s": compare(res["mlxllm spec"], res["mlx-lm spec"]),
            "plain tok/s": compare(res["mlxllm plain"], res["mlx-lm plain"])}  # fmt: skip
    print("| metric | mlxllm | mlx-lm | ratio | spread |\n|---|---|---|---|---|")
    for k, c in rows.items():
        print(table_row(k, c, ".1f"))
    sp = {t: statistics.median(res[f"{t} spec"]) / statistics.median(res[f"{t} plain"])
          for t in ("mlxllm", "mlx-lm")}  # fmt: skip
    print(
        f"speculative / plain: mlxllm {sp['mlxllm']:.2f}x, mlx-lm {sp['mlx-lm']:.2f}x; "
        f"tokens from drafts: mlxllm {statistics.mean(acc['mlxllm']):.0%} of drafts kept, "
        f"mlx-lm {statistics.mean(acc['mlx-lm']):.0%} of tokens from the draft; "
        f"outputs equal to plain: mlxllm {same['mlxllm']}/{len(acc['mlxllm'])}, mlx-lm "
        f"{same['mlx-lm']}/{len(acc['mlx-lm'])}",
        flush=True,
    )
    return {"tps": res, "acceptance": acc, "same": same, "rows": rows, "speedup": sp}


def _lm_tokenizer(folder: str):
    """mlx-lm's tokenizer of ``folder`` with no eos ids (every run generates ``--gen``)."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(Path(folder).expanduser())
    tok.eos_token_ids = set()
    return tok


def mtp(args, mine, tok) -> dict:
    from mlxllm.generation.step import generate_step
    from mlxllm.speculative import MTPDrafter, SpecStats, load_head, speculative_generate_step

    layer = load_head(mine, args.mtp_head)
    ps = prompts(tok, args.prompt_tokens, args.prompts)
    out = {"plain": [], "spec": [], "acceptance": [], "same": 0}
    for p in ps:
        plain = list(generate_step(mine, p, mine.make_cache(), max_tokens=args.gen))
        out["plain"].append(_decode_tps(lambda p=p: generate_step(
            mine, p, mine.make_cache(), max_tokens=args.gen), args.gen))  # fmt: skip
        st, got = SpecStats(), []

        def run(p=p, st=st, got=got):
            for t in speculative_generate_step(mine, MTPDrafter(mine, layer), p,
                                               mine.make_cache(), num_draft=args.num_draft,
                                               max_tokens=args.gen, stats=st):  # fmt: skip
                got.append(t)
                yield t

        out["spec"].append(_decode_tps(run, args.gen))
        out["acceptance"].append(st.acceptance)
        out["same"] += got == plain
    by_pos = [statistics.mean(a[i] for a in out["acceptance"] if len(a) > i)
              for i in range(args.num_draft)]  # fmt: skip
    base, spec = statistics.median(out["plain"]), statistics.median(out["spec"])
    print(
        f"MTP head, k={args.num_draft}: acceptance by draft position "
        f"{', '.join(f'{a:.0%}' for a in by_pos)}; decode {spec:.1f} tok/s vs plain {base:.1f} "
        f"({spec / base:.2f}x); outputs equal to plain {out['same']}/{len(ps)}",
        flush=True,
    )
    out["by_position"] = by_pos
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--scenario", nargs="*", default=None,
                    choices=("verify", "forced", "pair", "mtp"))  # fmt: skip
    ap.add_argument("--context", nargs="+", type=int, default=[1024])
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.5, 0.8, 1.0])
    ap.add_argument("--num-draft", type=int, default=2)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft", default=None, help="draft model folder (pair)")
    ap.add_argument("--draft-bits", type=int, default=4, help="else the model's own copy")
    ap.add_argument("--mtp-head", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import mlx.core as mx

    gpu = mx.default_device() == mx.gpu
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    folder = Path(args.model).expanduser().is_dir()
    scenarios = args.scenario or (["verify", "forced"] + (["pair"] if folder else [])
                                  + (["mtp"] if args.mtp_head else []))  # fmt: skip
    mine, theirs, tok, vocab = load_pair(args.model, args.layers, args.dtype)
    results = {"args": vars(args), "device": "gpu" if gpu else "cpu", "mlx": mx.__version__}
    print(
        f"# speculative: {Path(args.model).name}{f' ({args.layers} layers)' if args.layers else ''}"
        f", {args.dtype}, mlx {mx.__version__} ({results['device']})",
        flush=True,
    )
    for s in scenarios:
        if s == "verify":
            results[s] = verify(args, mine, theirs, vocab)
        elif s == "forced":
            results[s] = forced(args, mine, vocab)
        elif s == "pair":
            results[s] = pair(args, mine, theirs, tok)
        elif s == "mtp":
            results[s] = mtp(args, mine, tok)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
