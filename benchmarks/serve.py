"""HTTP serving benchmark: ``mlxllm serve`` against ``mlx_lm.server``, side by side.

Both servers run the same model folder in the same dtype, each as its own subprocess on
127.0.0.1 (a free port), and get the same requests: OpenAI ``/v1/chat/completions`` with
``stream: true``, ``temperature: 0``, ``max_tokens: --gen`` and ``stream_options: {"include_usage":
true}`` (both servers send a final ``usage`` chunk), through the official ``openai`` client, one
thread per concurrent client. A fresh server is started for every scenario and repeat (ready when
``/health`` answers for mlxllm, ``/v1/models`` for mlx-lm), warmed up with untimed requests that
share no text with the timed ones, and stopped (SIGTERM, then SIGKILL) afterwards; the two
servers alternate over ``--repeats`` (the order flips every repeat).

The dtype (``--dtype``): float32 by default on MLX's CPU backend (mlx-lm's float16 prefill is
very slow there), else the checkpoint's own. ``mlx_lm.server`` has no dtype flag and computes in
the dtype the weights are stored in, so for another dtype both servers serve a copy of the folder
with the floating-point tensors cast (written once under ``~/.cache/mlxllm-bench``); mlxllm also
gets ``--dtype``.

Scenarios (``--scenario``, default both):

- ``concurrency``: for each N of ``--clients``, N clients send one request each at once, a user
  message "Write a long story about TOPIC ..." with a topic of its own (no two requests of a run
  share a topic, so the only prefix they share is the chat template's).
- ``fanout``: ``--agents`` sub-agents at once (a coding agent's parallel sub-tasks): each runs
  its own conversation of ``--turns`` turns, as in ``agent``, under the same system prompt, with
  questions of its own; all start together. mlxllm's engine computes the shared new prefix
  once (the other requests wait for it and start from the prefix store), mlx-lm's server
  prefills every request's whole prompt when nothing is cached yet.
- ``agent``: one agent conversation, turn after turn: a system prompt of ``--system-len`` words
  of deterministic filler text (seeded), then ``--turns`` turns; each turn sends the whole
  conversation again (every earlier user message and the assistant's answer as received) plus a
  new user message. mlxllm can reuse the prefix from its prefix store, mlx-lm from its server's
  ``LRUPromptCache``.

Metrics (client side, ``time.perf_counter()`` in the client threads; a token has arrived when
the stream chunk carrying its text is read):

- tokens: ``usage.completion_tokens`` of the final usage chunk, as each server counts them
  (the timed prompts ask for long answers, so every request should end with
  ``finish_reason: length`` at exactly ``--gen`` tokens; the report prints the finish reasons).
- TTFT: from just before the client's request to its first non-empty ``delta.content``; mean
  over the clients and max.
- decode tok/s (aggregate): content chunks that arrive after every client has its first one,
  over the time from that moment to the last content chunk (one client: chunks after the first
  over first-to-last). Both servers send one content chunk per generated token (a token whose
  text is held back, e.g. half a UTF-8 character, comes with the next one); the report prints
  content chunks against usage tokens so that this can be checked.
- wall: from the first request sent to the last stream closed; throughput = the usage tokens of
  all clients / wall.
- agent: per-turn TTFT, total time (the turns' request times summed), prompt tokens and the
  prompt tokens each server says it took from its cache (``usage.prompt_tokens_details.
  cached_tokens``).
- server peak RSS: ``VmHWM`` of the server process (Linux), read just before it is stopped.

The report prints each server's median over the repeats, the ratio mlxllm / mlx-lm (median of
the per-repeat ratios) and the spread (min-max of those ratios). Results also go to
``benchmarks/results/serve.json``::

    python benchmarks/serve.py --clients 1 4 --gen 16 --repeats 1                       # CPU
    python benchmarks/serve.py --scenario agent --turns 3 --gen 16 --system-len 300 \\
        --repeats 1                                                                      # CPU
    python benchmarks/serve.py --model ~/models/qwen2.5-7b-instruct --repeats 3          # GPU
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata as md
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from _common import DEFAULT_MODEL, REPO, bench_env, compare, fmt, median, table_row

RESULTS = REPO / "benchmarks" / "results" / "serve.json"
LOGS = REPO / "benchmarks" / "results" / "serve-logs"
CAST_ROOT = Path("~/.cache/mlxllm-bench").expanduser()
SCENARIOS = ("concurrency", "agent", "fanout")
TOOLS = ("mlxllm", "mlx-lm")
DTYPES = ("float32", "float16", "bfloat16")
MLX_LM_MODEL = "default_model"  # mlx_lm.server's name for the --model it was started with

# topics of the concurrency requests, adjective x noun (shuffled with the seed)
ADJECTIVES = (
    "brave silent ancient curious tiny golden lonely clever frozen hidden restless gentle "
    "broken distant wild patient"
).split()
NOUNS = (
    "lighthouse robot river library dragon orchard train violin glacier market comet garden "
    "bridge fox island clockmaker"
).split()
# the filler of the agent's system prompt
WORDS = (
    "system request cache token module function value buffer stream client server thread "
    "queue record index layer weight matrix vector batch kernel memory device network packet "
    "socket file folder path config option default limit error result report table column row "
    "key map list tree node graph edge order always never quickly carefully first then after "
    "before while reads writes checks returns keeps drops sends builds runs stores loads "
    "moves splits joins counts sorts the a each every one two small large new old fast slow "
    "local remote with without from into over under between and or but"
).split()


# ---------------------------------------------------------------------------------------------
# the model folder in the dtype both servers compute in


def _stored_dtype(model: Path) -> str | None:
    config = json.loads((model / "config.json").read_text())
    return config.get("torch_dtype") or config.get("dtype")


def model_folder(model: Path, dtype: str) -> Path:
    """``model`` itself when its weights are stored in ``dtype``, else a copy with every
    floating-point tensor cast to ``dtype`` (made once, under ``CAST_ROOT``)."""
    if _stored_dtype(model) == dtype:
        return model
    config = json.loads((model / "config.json").read_text())
    if config.get("quantization") or config.get("quantization_config"):
        raise SystemExit(f"{model} is quantized: use --dtype stored")
    out = CAST_ROOT / f"{model.name}-{dtype}"
    if (out / ".complete").exists():
        return out
    import mlx.core as mx

    print(f"writing a {dtype} copy of {model} to {out} ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = getattr(mx, dtype)
    for f in sorted(model.iterdir()):
        if f.suffix == ".safetensors":
            weights = mx.load(str(f))
            weights = {
                k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                for k, v in weights.items()
            }
            mx.save_safetensors(str(tmp / f.name), weights, metadata={"format": "mlx"})
            del weights
        elif f.is_file():
            shutil.copy2(f, tmp / f.name)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / ".complete").write_text(f"{model}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")  # fmt: skip


def random_folder(name: str, tokenizer: Path, seed: int) -> Path:
    """A checkpoint folder of the published config ``name`` (``moe_mla.CONFIGS``) with the
    seed's random bfloat16 tensors (``moe_parity.checkpoint_tensors``) and the tokenizer files
    of ``tokenizer`` (its vocabulary must fit the config's), made once under ``CAST_ROOT``.
    Both servers load it with their own loaders; answers are random text, timed the same."""
    from moe_mla import CONFIGS
    from moe_parity import checkpoint_tensors

    out = CAST_ROOT / f"random-{name}-seed{seed}"
    if (out / ".complete").exists():
        return out
    import mlx.core as mx

    print(f"writing random {name} weights to {out} ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = dict(CONFIGS[name], torch_dtype="bfloat16")
    config.setdefault("architectures", [{"qwen2": "Qwen2ForCausalLM"}.get(
        config["model_type"], "DeepseekV2ForCausalLM")])  # fmt: skip
    tensors = checkpoint_tensors(config, seed)
    names = sorted(tensors)
    shards = [names[i::8] for i in range(8)]  # eight files: none too large to write at once
    index = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(tmp / fname), {k: tensors[k] for k in part},
                            metadata={"format": "pt"})  # fmt: skip
        index.update(dict.fromkeys(part, fname))
    del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (tokenizer / f).exists():
            shutil.copy2(tokenizer / f, tmp / f)
    (tmp / ".complete").write_text(f"{name} seed {seed}, tokenizer {tokenizer}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# the servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(tool: str, folder: Path, port: int, dtype: str | None, batch: int) -> list:
    if tool == "mlxllm":
        # this checkout's CLI (``mlxllm serve``), whichever mlxllm is installed
        cmd = [sys.executable, str(REPO / "cli" / "main.py"), "serve", str(folder)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-batch", str(batch)]
        return cmd + (["--dtype", dtype] if dtype else [])
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(folder)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--decode-concurrency", str(batch)]
    return cmd


def server_settings(tool: str, batch: int) -> dict:
    if tool == "mlxllm":
        return {"max_batch": batch, "prefix store": "on (default size: the memory budget)"}
    # mlx_lm.server's defaults otherwise, stated so the report says what ran
    return {
        "decode_concurrency": batch,
        "prompt_concurrency": 8,
        "prefill_step_size": 2048,
        "prompt_cache_size": 10,
        "prompt_cache_bytes": None,
    }


class Server:
    """One server subprocess: started, polled until ready, stopped."""

    def __init__(self, tool: str, cmd: list, log: Path, env: dict):
        self.tool, self.cmd, self.log_path = tool, cmd, log
        self.port = int(cmd[cmd.index("--port") + 1])
        self.base = f"http://127.0.0.1:{self.port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_s: float | None = None

    def wait_ready(self, timeout: float) -> None:
        # mlx-lm's /v1/models sends its 200 before scanning the Hugging Face cache (which may
        # raise CacheNotFound, cutting the body): the status line is what counts
        url = self.base + ("/health" if self.tool == "mlxllm" else "/v1/models")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.tool} server exited {self.proc.returncode}: {self.tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - self.t0
                        return
            except (http.client.HTTPException, OSError):  # not up yet (URLError is an OSError)
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.tool} server not ready after {timeout:.0f} s: {self.tail()}")

    def peak_rss_gb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
        except OSError:
            pass
        return None

    def tail(self, n: int = 8) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").strip().splitlines()[-n:]
        return " | ".join(lines) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


# ---------------------------------------------------------------------------------------------
# the client


def _client(base: str, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout)


def chat_stream(client, model: str, messages: list, gen: int) -> dict:
    """One streamed chat request: when each content chunk arrived, the text, usage, finish."""
    out: dict = {"chunks": [], "text": "", "finish": None, "usage": None}
    parts = []
    out["sent"] = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=gen,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            out["usage"] = {
                "prompt": chunk.usage.prompt_tokens,
                "completion": chunk.usage.completion_tokens,
                "cached": getattr(details, "cached_tokens", None) if details else None,
            }
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                out["chunks"].append(now)
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                out["finish"] = choice.finish_reason
    out["done"] = time.perf_counter()
    out["text"] = "".join(parts)
    if not out["chunks"]:
        raise RuntimeError(f"no content in the answer (finish {out['finish']}, {out['usage']})")
    if out["usage"] is None:
        raise RuntimeError("the stream had no usage chunk")
    return out


def concurrent(client, model: str, message_lists: list[list], gen: int) -> list[dict]:
    """All requests at once, one thread each (released together by a barrier)."""
    n = len(message_lists)
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        barrier.wait()
        try:
            results[i] = chat_stream(client, model, message_lists[i], gen)
        except Exception as e:  # noqa: BLE001 (reported with the request)
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)}/{n} requests failed; first: {errors[0]}")
    return results


def point_metrics(rs: list[dict]) -> dict:
    start = min(r["sent"] for r in rs)
    ttft = [r["chunks"][0] - r["sent"] for r in rs]
    everyone = max(r["chunks"][0] for r in rs)  # every client has its first token
    last = max(r["chunks"][-1] for r in rs)
    window = sum(1 for r in rs for t in r["chunks"] if t > everyone)
    wall = max(r["done"] for r in rs) - start
    tokens = [r["usage"]["completion"] for r in rs]
    return {
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_max_s": max(ttft),
        "decode_tps": window / (last - everyone) if last > everyone else None,
        "wall_s": wall,
        "throughput_tps": sum(tokens) / wall,
        "tokens": tokens,
        "chunks": [len(r["chunks"]) for r in rs],
        "finish": dict(Counter(r["finish"] for r in rs)),
        "prompt_tokens": [r["usage"]["prompt"] for r in rs],
        "cached_tokens": [r["usage"]["cached"] for r in rs],
        "texts": [r["text"] for r in rs],
    }


def _story(topic: str) -> list[dict]:
    text = f"Write a long story about the {topic}, with many details, in at least five paragraphs."
    return [{"role": "user", "content": text}]


def topics(seed: int) -> list[str]:
    out = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
    random.Random(seed).shuffle(out)
    return out


def filler(seed: int, words: int) -> str:
    """``words`` words of deterministic pseudo-text, sentences of 6-15 words."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 15):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def _system(seed: int, words: int) -> str:
    return (
        "You are a coding assistant. Answer every question at length, using the project notes "
        "below.\n\nProject notes:\n" + filler(seed, words)
    )


def _question(t: int, topic: str) -> str:
    return (
        f"Question {t + 1}: explain in detail, step by step, how the notes apply to the {topic}, "
        "and write a long answer."
    )


def agent_turns(client, model: str, system: str, questions: list[str], gen: int) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    turns = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        r = chat_stream(client, model, list(messages), gen)
        messages.append({"role": "assistant", "content": r["text"]})
        turns.append(
            {
                "ttft_s": r["chunks"][0] - r["sent"],
                "time_s": r["done"] - r["sent"],
                "prompt_tokens": r["usage"]["prompt"],
                "cached_tokens": r["usage"]["cached"],
                "tokens": r["usage"]["completion"],
                "chunks": len(r["chunks"]),
                "finish": r["finish"],
                "text": r["text"],
            }
        )
    return turns


def fanout_turns(client, model: str, system: str, tasks: list[list[str]], gen: int):
    """Sub-agents: one thread per task list, all released together, each running its turns
    under the same system prompt. Returns (per-turn rows over the agents: mean TTFT, summed
    tokens; wall time from the release to the last answer)."""
    n = len(tasks)
    barrier = threading.Barrier(n + 1)
    results: list = [None] * n

    def one(i):
        barrier.wait()
        try:
            results[i] = agent_turns(client, model, system, tasks[i], gen)
        except Exception as e:  # noqa: BLE001 (reported with the agent)
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if isinstance(r, dict)]
    if errors:
        raise RuntimeError(f"{len(errors)}/{n} agents failed; first: {errors[0]}")
    rows = []
    for turn in zip(*results, strict=True):
        rows.append({
            "ttft_s": statistics.fmean(t["ttft_s"] for t in turn),
            "time_s": max(t["time_s"] for t in turn),
            **{k: sum(t[k] or 0 for t in turn)
               for k in ("prompt_tokens", "cached_tokens", "tokens", "chunks")},
            "finish": ",".join(sorted({t["finish"] for t in turn})),
            "text": "\n".join(t["text"] for t in turn),
        })  # fmt: skip
    return rows, wall


def agent_summary(turns: list[dict]) -> dict:
    later = [t["ttft_s"] for t in turns[1:]]
    return {
        "total_s": sum(t["time_s"] for t in turns),
        "ttft_mean_s": statistics.fmean(t["ttft_s"] for t in turns),
        "ttft_first_s": turns[0]["ttft_s"],
        "ttft_later_s": statistics.fmean(later) if later else None,
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "cached_tokens": sum(t["cached_tokens"] or 0 for t in turns),
        "tokens": sum(t["tokens"] for t in turns),
    }


# ---------------------------------------------------------------------------------------------
# one server, one scenario


def run_one(tool: str, scenario: str, folder: Path, dtype: str | None, args, rep: int) -> dict:
    batch = max(32, *args.clients)
    cmd = server_command(tool, folder, _free_port(), dtype, batch)
    log = LOGS / f"{scenario}-{tool}-{rep + 1}.log"
    server = Server(tool, cmd, log, bench_env())
    res: dict = {"tool": tool, "command": cmd, "log": str(log)}
    try:
        server.wait_ready(args.start_timeout)
        res["ready_s"] = server.ready_s
        client = _client(server.base, args.timeout)
        model = str(folder) if tool == "mlxllm" else MLX_LM_MODEL
        # untimed warm-up (mlx-lm loads the model in its generation thread, after the HTTP
        # server is up; BLAS threads, allocator): two topics from the end of the list, which
        # the timed requests never reach, so they share nothing but the chat template
        names = topics(args.seed)
        warm_topics = names[-2:]
        if scenario == "concurrency":
            concurrent(client, model, [_story(t) for t in warm_topics], 4)
            res["points"] = []
            used = 0
            for n in args.clients:
                asks = [_story(t) for t in names[used : used + n]]
                rs = concurrent(client, model, asks, args.gen)
                used += n
                point = {"clients": n, **point_metrics(rs)}
                res["points"].append(point)
                short = {k: v for k, v in point.items() if k != "texts"}
                print(f"  {tool} N={n}: {json.dumps(short)[:240]}", file=sys.stderr, flush=True)
        else:
            warm_system = _system(args.seed + 1, args.system_len)
            warm_q = [_question(t, x) for t, x in enumerate(warm_topics)]
            agent_turns(client, model, warm_system, warm_q, args.gen)
            system = _system(args.seed, args.system_len)
            if scenario == "agent":
                qs = [_question(t, x) for t, x in enumerate(names[: args.turns])]
                t = time.perf_counter()
                turns = agent_turns(client, model, system, qs, args.gen)
                res["wall_s"] = time.perf_counter() - t
                res["summary"] = agent_summary(turns)
            else:  # fanout: the sub-agents' total is the wall time until the last one is done
                tasks = [[_question(t, x) for t, x in enumerate(names[a :: args.agents])]
                         [: args.turns] for a in range(args.agents)]  # fmt: skip
                turns, res["wall_s"] = fanout_turns(client, model, system, tasks, args.gen)
                res["summary"] = dict(agent_summary(turns), total_s=res["wall_s"])
            res["turns"] = turns
            print(f"  {tool}: {json.dumps(res['summary'])}", file=sys.stderr, flush=True)
        res["peak_rss_gb"] = server.peak_rss_gb()
    except Exception as e:  # noqa: BLE001 (one failed run is reported, the others go on)
        res["error"] = f"{type(e).__name__}: {e}"
        if server.proc.poll() is not None or "server" not in res["error"]:
            res["error"] += f" [log {log}: {server.tail()}]"
    finally:
        server.stop()
    return res


# ---------------------------------------------------------------------------------------------
# the report

BATCH_METRICS = (
    ("ttft_mean_s", "TTFT mean s (lower)", ".3f"),
    ("ttft_max_s", "TTFT max s (lower)", ".3f"),
    ("decode_tps", "decode tok/s (higher)", ".1f"),
    ("wall_s", "wall s (lower)", ".2f"),
    ("throughput_tps", "throughput tok/s (higher)", ".1f"),
)
AGENT_METRICS = (
    ("total_s", "total s (lower)", ".2f"),
    ("ttft_mean_s", "TTFT mean s per turn (lower)", ".3f"),
    ("ttft_first_s", "TTFT turn 1 s (lower)", ".3f"),
    ("ttft_later_s", "TTFT mean s, turns 2+ (lower)", ".3f"),
    ("prompt_tokens", "prompt tokens (all turns)", "d"),
    ("cached_tokens", "prompt tokens from cache", "d"),
    ("tokens", "generated tokens", "d"),
)
RSS = ("peak_rss_gb", "server peak RSS GB (lower)", ".2f")


def _same(a: list[str], b: list[str]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def summarize_concurrency(runs: dict) -> tuple[list, list[str]]:
    a_runs, b_runs = runs["mlxllm"], runs["mlx-lm"]
    rows = []
    lines = ["| clients | metric | mlxllm | mlx-lm | ratio | spread |", "|---|---|---|---|---|---|"]
    for i, point in enumerate(a_runs[0]["points"]):
        n = point["clients"]
        row: dict = {"clients": n}
        for key, label, spec in BATCH_METRICS:
            mine, theirs = ([r["points"][i][key] for r in rs] for rs in (a_runs, b_runs))
            c = compare(mine, theirs)
            row[key] = c
            lines.append(table_row(f"{n} | {label}", c, spec))
        row["first_repeat"] = {
            tool: {k: rs[0]["points"][i][k] for k in ("tokens", "chunks", "finish",
                                                       "prompt_tokens", "cached_tokens")}
            for tool, rs in runs.items()
        }  # fmt: skip
        row["same_text"] = _same(a_runs[0]["points"][i]["texts"], b_runs[0]["points"][i]["texts"])
        rows.append(row)
    c = compare([r["peak_rss_gb"] for r in a_runs], [r["peak_rss_gb"] for r in b_runs])
    lines.append(table_row(f"all | {RSS[1]}", c, RSS[2]))
    rows.append({"peak_rss_gb": c})
    lines.append("")
    for row in rows[:-1]:
        n = row["clients"]
        for tool, f in row["first_repeat"].items():
            lines.append(
                f"N={n} {tool}: usage tokens {sorted(set(f['tokens']))}, content chunks "
                f"{sorted(set(f['chunks']))}, finish {f['finish']}, prompt tokens "
                f"{sorted(set(f['prompt_tokens']))}, cached {sorted(set(f['cached_tokens']))}"
            )
        lines.append(f"N={n}: answers with identical text in both (first repeat) "
                     f"{row['same_text']}/{n}")  # fmt: skip
    return rows, lines


def summarize_agent(runs: dict) -> tuple[dict, list[str]]:
    a_runs, b_runs = runs["mlxllm"], runs["mlx-lm"]
    out: dict = {}
    lines = ["| metric | mlxllm | mlx-lm | ratio | spread |", "|---|---|---|---|---|"]
    for key, label, spec in (*AGENT_METRICS, RSS):
        get = (lambda r, k=key: r[k]) if key == RSS[0] else (lambda r, k=key: r["summary"][k])
        c = compare([get(r) for r in a_runs], [get(r) for r in b_runs])
        out[key] = c
        lines.append(table_row(label, c, spec))
    lines += ["", "per turn (median over repeats): TTFT s, prompt tokens / from cache",
              "| turn | mlxllm TTFT | mlx-lm TTFT | ratio | spread | mlxllm prompt / cached | "
              "mlx-lm prompt / cached |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    out["turns"] = []
    for i in range(len(a_runs[0]["turns"])):
        c = compare([r["turns"][i]["ttft_s"] for r in a_runs],
                    [r["turns"][i]["ttft_s"] for r in b_runs])  # fmt: skip
        toks = {
            tool: (median([r["turns"][i]["prompt_tokens"] for r in rs]),
                   median([r["turns"][i]["cached_tokens"] for r in rs]))
            for tool, rs in runs.items()
        }  # fmt: skip
        out["turns"].append({"ttft_s": c, "prompt_cached": toks})
        row = table_row(str(i + 1), c, ".3f")
        cells = [f"{fmt(p, 'd')} / {fmt(k, 'd')}" for p, k in toks.values()]
        lines.append(row + " " + " | ".join(cells) + " |")
    lines.append("")
    for tool, rs in runs.items():
        t = rs[0]["turns"]
        lines.append(
            f"{tool} (first repeat): usage tokens per turn {[x['tokens'] for x in t]}, content "
            f"chunks {[x['chunks'] for x in t]}, finish {[x['finish'] for x in t]}"
        )
    same = _same([t["text"] for t in a_runs[0]["turns"]], [t["text"] for t in b_runs[0]["turns"]])
    n = len(a_runs[0]["turns"])
    lines.append(f"turns with identical text in both (first repeat): {same}/{n}")
    out["same_text"] = same
    return out, lines


# ---------------------------------------------------------------------------------------------
# driver


def _on_cpu() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.cpu and not (cuda is not None and cuda.is_available())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="a Hugging Face checkpoint folder, or a config of moe_mla.CONFIGS "
                    "(random weights, the tokenizer of --tokenizer)")  # fmt: skip
    ap.add_argument("--tokenizer", default=str(DEFAULT_MODEL),
                    help="the folder whose tokenizer a random-weights model gets")  # fmt: skip
    ap.add_argument(
        "--dtype",
        choices=(*DTYPES, "stored"),
        default=None,
        help="the dtype both servers compute in (default: float32 on the CPU, else stored)",
    )
    ap.add_argument("--scenario", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--gen", type=int, default=32, help="max_tokens of every request")
    ap.add_argument("--system-len", type=int, default=1500, help="words of the system prompt")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--agents", type=int, default=4, help="sub-agents of the fanout scenario")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per server")
    ap.add_argument("--seed", type=int, default=0, help="topics and filler text")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds to become ready")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = ap.parse_args(argv)
    n_topics = len(ADJECTIVES) * len(NOUNS) - 2  # the last two are the warm-up's
    if (sum(args.clients) > n_topics or args.turns * max(1, args.agents) > n_topics
            or min(args.clients) < 1):  # fmt: skip
        raise SystemExit(f"--clients: at least 1 each, {n_topics} in all; --turns at most that")

    from moe_mla import CONFIGS

    if args.model in CONFIGS:
        model = random_folder(args.model, Path(args.tokenizer).expanduser(), args.seed)
    else:
        model = Path(args.model).expanduser().resolve()
    stored = _stored_dtype(model)
    dtype = args.dtype or ("float32" if _on_cpu() else "stored")
    dtype = stored if dtype == "stored" else dtype
    folder = model_folder(model, dtype)
    mlxllm_dtype = dtype if dtype in DTYPES else None
    versions = {p: md.version(p) for p in ("mlx", "mlx-lm", "openai")}
    results: dict = {"args": vars(args), "model": str(model), "folder": str(folder),
                     "dtype": dtype, "versions": versions, "scenarios": {}}  # fmt: skip
    batch = max(32, *args.clients)
    settings = {t: server_settings(t, batch) for t in TOOLS}
    report: list[str] = []
    for scenario in args.scenario:
        runs: dict = {t: [] for t in TOOLS}
        for rep in range(args.repeats):
            order = TOOLS if rep % 2 == 0 else TOOLS[::-1]  # drift hits both alike
            for tool in order:
                print(f"[{scenario}] repeat {rep + 1}/{args.repeats}: {tool} ...", file=sys.stderr)
                t = time.perf_counter()
                r = run_one(tool, scenario, folder, mlxllm_dtype, args, rep)
                if "error" in r:
                    print(f"  ERROR {r['error']}", file=sys.stderr)
                else:
                    print(f"  done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
                runs[tool].append(r)
        entry: dict = {"runs": runs}
        results["scenarios"][scenario] = entry
        errors = [f"{t} (repeat {i + 1}): {r['error']}" for t in TOOLS
                  for i, r in enumerate(runs[t]) if "error" in r]  # fmt: skip
        if errors:
            report += [f"## {scenario}: ERROR", *errors, ""]
            continue
        report.append(
            f"## {scenario}: {model.name}, {dtype}, mlx {versions['mlx']} "
            f"({'cpu' if _on_cpu() else 'gpu'}), mlx-lm {versions['mlx-lm']}; median of "
            f"{args.repeats} alternating runs; ratio = mlxllm / mlx-lm (median of the per-repeat "
            "ratios), spread = their min-max"
        )
        report.append(f"mlxllm serve: {settings['mlxllm']}; mlx_lm.server: {settings['mlx-lm']}")
        if scenario in ("agent", "fanout"):
            a = runs["mlxllm"][0]["turns"][0]
            many = scenario == "fanout"
            report.append(
                (f"{args.agents} sub-agents at once, each with its own questions under " if many
                 else "") +
                f"system prompt {args.system_len} words (turn 1: {a['prompt_tokens']} prompt "
                f"tokens{' in all' if many else ''}), {args.turns} turns of max_tokens "
                f"{args.gen}; each turn resends the conversation; TTFT = request to first "
                "content chunk" + (" (mean over the agents); total = wall time until the last "
                "agent is done; tokens summed over the agents" if many else
                "; total = the turns' request times summed")
            )  # fmt: skip
            entry["summary"], lines = summarize_agent(runs)
        else:
            report.append(
                f"N clients at once, one story request each, max_tokens {args.gen}, "
                "temperature 0; tokens = usage.completion_tokens; decode tok/s = content chunks "
                "after every client has its first one / time from then to the last chunk"
            )
            entry["summary"], lines = summarize_concurrency(runs)
        report += lines + [""]
    print("\n" + "\n".join(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
