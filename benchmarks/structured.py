"""Constrained decoding: llguidance, xgrammar and outlines-core on the same JSON schemas.

Why this exists: ``mlxllm/server/structured.py`` masks every decode step of a structured-output
request (``response_format`` json_object / json_schema, forced tool calls) with llguidance; this
benchmark gives the figures behind that choice. Every library runs in its own subprocess
(``python structured.py --worker LIB --tokenizer NAME``, a fresh process each time, so every
compile is the first of its schema), alternating over ``--repeats`` (the order rotates every
repeat, so each library runs first, second and third once in three repeats).

Tokenizers (``--tokenizers``): the fixture folders ``qwen2.5-coder-0.5b-instruct`` (model
``vocab_size`` 151936) and ``smollm2-135m-instruct`` (49152) under ``MLXLLM_FIXTURES``; the mask
is as wide as the model's ``vocab_size`` (config.json), as the server's is. Documents are
tokenized by mlxllm's own ``Tokenizer`` (``add_special_tokens=False``), and the eos ids are its
``eos_token_ids``. How each library gets the tokenizer (timed as "setup"):

- llguidance: ``LLTokenizer(tokenizer.json text, n_vocab=vocab_size, eos_token=eos ids)``,
  exactly as the server builds it.
- xgrammar: ``TokenizerInfo(vocab by id, VocabType.BYTE_LEVEL, vocab_size=, stop_token_ids=)``
  from the ``tokenizers`` vocabulary, no transformers tokenizer (on both fixtures its decoded
  vocabulary equals ``TokenizerInfo.from_huggingface(AutoTokenizer...)``'s, which costs about
  3 s more here), then ``GrammarCompiler(info, cache_enabled=False)``. ``import xgrammar``
  imports torch; the import time is reported apart from the setup.
- outlines-core: ``Vocabulary(eos id, {token bytes: ids})``, the byte-level vocabulary decoded
  here (its ``Vocabulary.from_pretrained`` wants the Hugging Face Hub), special added tokens
  left out; it takes a single eos id (the tokenizer's ``eos_token_id``).

Grammars, configured as close to the server's ``FIXED`` llguidance options (``", "`` and
``": "`` separators, no other whitespace) as each library allows:

- llguidance: ``LLMatcher.grammar_from_json_schema(schema, defaults=FIXED | {"coerce_one_of":
  True})`` (``FIXED`` imported from the server module) and ``LLMatcher(tokenizer, grammar)``.
  ``coerce_one_of`` reads ``oneOf`` as ``anyOf``, which is what xgrammar and outlines-core do;
  the server does not set it, so it refuses ``oneOf``: the report notes every schema that
  ``FIXED`` alone refuses (``LLMatcher.validate_grammar``, untimed).
- xgrammar: ``compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "),
  strict_mode=False)`` (strict mode would make unlisted properties default to forbidden, so
  ``{"type": "object"}`` would only allow ``{}``; JSON Schema and llguidance allow them) and
  ``GrammarMatcher(compiled)``; property order is the schema's (``any_order=False``) as in the
  others.
- outlines-core: ``Index(build_regex_from_schema(schema, whitespace_pattern="[ ]?"),
  vocabulary)`` and ``Guide(index)``. It has no separator option: an optional single space is
  allowed around every ``{ } [ ] , :``, so it accepts more spellings than the other two (the
  fixed documents are among them); generic values nest at most 3 deep (its
  ``max_recursion_depth`` default).

Schemas (``SCHEMAS`` in ``_structured_cases.py``, growing complexity; every object with listed
properties is closed with ``additionalProperties: false``, so that all three libraries mean the
same thing): ``json_object`` (``{"type": "object"}``, what ``response_format: json_object``
sends), ``flat`` (string, integer, enum, boolean fields), ``nested`` (objects in arrays,
``maxLength``, ``minimum`` / ``maximum``, ``minItems`` / ``maxItems``), ``union`` (``anyOf`` /
``oneOf`` through ``$ref`` into ``$defs``, a nullable ``anyOf``) and ``tool`` (an OpenAPI-style
tool's parameters: 40 properties, 11 required, enums, ranges, arrays of objects, maps, ``type:
[string, null]``). Each has one hand-written valid document (``DOCS``), serialized with ``", "``
/ ``": "`` separators and no other whitespace, checked against its schema with ``jsonschema``
before anything runs.

Measured per library, tokenizer and schema:

1. setup: the tokenizer conversion above, once per process (and the library's import time).
   Then "first use": compile and follow ``[1, 2]`` for an array of integers (not one of the
   schemas), untimed in the tables below: a process's first grammar pays one-off costs (about
   2 ms of llguidance's first mask, 0.1 ms of xgrammar's), which the server pays once.
2. compile: from the schema dict to a matcher ready for its first mask (the library's schema
   conversion, compile and the first matcher), in a fresh process. llguidance builds its lexer
   lazily, so part of its work lands in the first masks; "1st mask" is reported on its own.
3. per-token masking while following the valid document: for each of its tokens, write the
   allowed-token bitmask into a preallocated ``(1, ceil(vocab/32))`` int32 array (the form all
   three use: llguidance ``unsafe_compute_mask_ptr``, which ``llguidance.numpy``'s
   ``fill_next_token_bitmask`` calls; xgrammar ``GrammarMatcher.fill_next_token_bitmask``;
   outlines-core ``Guide.write_mask_into``), check that the document's next token is allowed
   (not timed; a library that rejects a token of the valid document gets an error for that
   schema, not a number), then advance by that token (llguidance ``consume_token``, xgrammar
   ``accept_token``, outlines-core ``Guide.advance``). One more mask after the last token must
   allow an eos id. Reported: mask mean and p99 in microseconds over those masks (with ~30-400
   masks per document p99 is close to the max), advance mean, and "doc ms" = all masks and
   advances of the document. Then the matcher is reset and follows the document again ("warm
   mask us"): what the first pass left in the matcher's caches (llguidance builds its lexer
   states lazily; a fresh request in the server starts cold). The server's own call,
   ``LLMatcher.compute_bitmask()``, computes the same mask and returns it as bytes.
4. cross-check: ``--invalid`` (8) invalid documents per schema, drawn from the valid one by a
   seeded RNG (``--seed``): a value of the wrong type, a string outside its enum / const, a
   600-character string, a number of +-10^7, an extra property, a missing property, an array of
   0 or 40 items, a trailing comma before a ``}`` / ``]``, or the document without its last
   character; each mutation is kept only when ``jsonschema`` says the result is invalid (the
   last two are not JSON at all). A library rejects a document when its mask disallows one of
   the document's tokens or, after the last, every eos id. The report says how many each
   library rejects and which invalid documents some library accepts.

Time limits: a worker that sends nothing for ``--schema-timeout`` (25) seconds, on its setup or
on one schema, is killed and the schema gets that as its error (outlines-core's compile of the
larger schemas with a 151K vocabulary takes minutes); a new worker takes the schemas after it.
A schema that compiled slower than ``--slow`` (5) seconds, or timed out, is run in the first
repeat only (the report says "1 run"), which keeps the default run near 3 minutes on 2 cores.

The report prints each library's median over the repeats, and for compile, mask mean and setup
the ratio library / llguidance (median of the per-repeat ratios, repeat i against llguidance's
repeat i) with its spread (min-max). Results go to ``benchmarks/results/structured.json``
(git-ignored; ``--out`` to change)::

    python benchmarks/structured.py                      # both tokenizers, 3 repeats, ~3 min
    python benchmarks/structured.py --tokenizers qwen2.5 --libs llguidance xgrammar --repeats 1

xgrammar and outlines-core are benchmark-only dependencies (``pip install xgrammar
outlines-core``); a library that is not installed is left out with a line saying so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import importlib.util
import json
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import FIXTURES, REPO, bench_env, fmt, median, ratio
from _structured_cases import (
    DOCS,
    SCHEMAS,
    SEPARATORS,
    WARMUP_DOC,
    WARMUP_SCHEMA,
    check_docs,
    dumps,
    invalid_docs,
)

RESULTS = REPO / "benchmarks" / "results" / "structured.json"
LIBS = ("llguidance", "xgrammar", "outlines-core")
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}
TOKENIZERS = {
    "qwen2.5": FIXTURES / "qwen2.5-coder-0.5b-instruct",
    "smollm2": FIXTURES / "smollm2-135m-instruct",
}

# ---------------------------------------------------------------------------------------------
# the libraries (worker side): setup, compile, matcher, mask, advance


class Unsupported(Exception):
    """The library cannot do this (tokenizer kind, schema feature)."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


class Llguidance:
    def __init__(self, tok, vocab: int):
        import llguidance

        from mlxllm.server.structured import FIXED

        self.ll, self.fixed = llguidance, FIXED
        self.tokenizer = llguidance.LLTokenizer(tok._backend.tok.to_str(), n_vocab=vocab,
                                                eos_token=sorted(tok.eos_token_ids))  # fmt: skip

    def compile(self, schema: dict):
        options = {**self.fixed, "coerce_one_of": True}  # oneOf as anyOf, as the others do
        return self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise Unsupported(m.get_error())
        return m

    def note(self, schema: dict) -> str | None:
        """What the server's own options (``FIXED`` alone) say about ``schema``."""
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=self.fixed
        )
        err = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        return f"the server's FIXED options refuse it: {err.splitlines()[0]}" if err else None

    @staticmethod
    def fill(m, buf, ptr: int, nbytes: int) -> None:
        m.unsafe_compute_mask_ptr(ptr, nbytes)

    @staticmethod
    def advance(m, token: int) -> bool:
        return m.consume_token(token)


class Xgrammar:
    def __init__(self, tok, vocab: int):
        import xgrammar

        self.xgr = xgrammar
        encoded = [""] * vocab  # ids past the tokenizer's: empty, never allowed
        for text, i in tok._backend.tok.get_vocab(with_added_tokens=True).items():
            encoded[i] = text
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                      stop_token_ids=sorted(tok.eos_token_ids))  # fmt: skip
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=SEPARATORS, strict_mode=False
        )

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    @staticmethod
    def fill(m, buf, ptr: int, nbytes: int) -> None:
        m.fill_next_token_bitmask(buf)

    @staticmethod
    def advance(m, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore:
    def __init__(self, tok, vocab: int):
        import outlines_core

        self.oc = outlines_core
        spec = json.loads(tok._backend.tok.to_str())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise Unsupported("this benchmark builds outlines-core vocabularies of byte-level BPE")
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        eos = tok.eos_token_id
        decode = _byte_decoder()
        table: dict[bytes, list[int]] = {}
        for text, i in tok._backend.tok.get_vocab(with_added_tokens=True).items():
            if i == eos or added.get(i, {}).get("special"):
                continue
            raw = text.encode() if i in added else bytes(decode[c] for c in text)
            table.setdefault(raw, []).append(i)
        if max(i for ids in table.values() for i in ids) >= vocab:
            raise Unsupported("tokenizer ids past the model's vocab_size")
        self.vocabulary = outlines_core.Vocabulary(eos, table)
        self.eos = eos

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema),
                                                            whitespace_pattern="[ ]?")  # fmt: skip
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index):
        return self.oc.Guide(index)

    @staticmethod
    def fill(m, buf, ptr: int, nbytes: int) -> None:
        m.write_mask_into(ptr, buf.size, 4)

    @staticmethod
    def advance(m, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def _allowed(buf, token: int) -> bool:
    return bool((int(buf[0, token >> 5]) >> (token & 31)) & 1)


def _follow(lib, m, tokens: list[int], eos: list[int], buf, timed: bool):
    """Mask, check, advance over ``tokens``, then one mask for eos. Returns ``(rejected_at,
    mask_ns, advance_ns)``: the index of the first disallowed token (``len(tokens)``: no eos
    allowed at the end), None when the whole document is accepted."""
    ptr, nbytes = buf.ctypes.data, buf.nbytes
    clock = time.perf_counter_ns
    masks: list[int] = []
    advances: list[int] = []
    for i, t in enumerate(tokens):
        t0 = clock()
        lib.fill(m, buf, ptr, nbytes)
        t1 = clock()
        if not _allowed(buf, t):
            return i, masks, advances
        t2 = clock()
        ok = lib.advance(m, t)
        t3 = clock()
        if timed:
            masks.append(t1 - t0)
            advances.append(t3 - t2)
        if not ok:  # the mask allowed it but the matcher did not take it
            return i, masks, advances
    t0 = clock()
    lib.fill(m, buf, ptr, nbytes)
    masks.append(clock() - t0)
    if not any(_allowed(buf, e) for e in eos):
        return len(tokens), masks, advances
    return None, masks, advances


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def worker(lib_name: str, tok_name: str, schemas: list[str], n_invalid: int, seed: int) -> None:
    import numpy as np

    from mlxllm.tokenizer import Tokenizer

    folder = TOKENIZERS[tok_name]
    tok = Tokenizer(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    t = time.perf_counter()
    __import__(MODULES[lib_name])
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        lib = ADAPTERS[lib_name](tok, vocab)
    except Unsupported as e:
        print("RESULT " + json.dumps({"error": f"setup: {e}"}), flush=True)
        return
    setup_s = time.perf_counter() - t
    # eos ids the mask must allow at the end (outlines-core knows only one)
    eos = [lib.eos] if isinstance(lib, OutlinesCore) else sorted(tok.eos_token_ids)
    buf = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)
    # the process's first grammar pays one-off costs (~2 ms of llguidance's first mask): paid
    # here, on a schema of its own, so that the first schema measured is not charged with them
    t = time.perf_counter()
    first = lib.matcher(lib.compile(WARMUP_SCHEMA))
    _follow(lib, first, tok.encode(WARMUP_DOC, add_special_tokens=False), eos, buf, timed=False)
    first_use_ms = (time.perf_counter() - t) * 1e3
    setup = {"import_s": import_s, "setup_s": setup_s, "first_use_ms": first_use_ms}
    print("SETUP " + json.dumps(setup), flush=True)
    for name in schemas:
        tokens = tok.encode(dumps(DOCS[name]), add_special_tokens=False)
        r: dict = {"schema": name, "tokens": len(tokens)}
        gc.collect()
        gc.disable()
        try:
            t = time.perf_counter()
            compiled = lib.compile(SCHEMAS[name])
            m = lib.matcher(compiled)
            r["compile_ms"] = (time.perf_counter() - t) * 1e3
            print(f"COMPILED {name}", flush=True)  # a timeout from here on is not the compile's
            at, masks, advances = _follow(lib, m, tokens, eos, buf, timed=True)
        except Exception as e:  # the library's own error for this schema, reported as such
            gc.enable()
            r["error"] = f"{type(e).__name__}: {e}"[:300]
            print("SCHEMA " + json.dumps(r), flush=True)
            continue
        gc.enable()
        if at is not None:
            if at == len(tokens):
                what = "no eos allowed at the end"
            else:
                what = f"token {at} {tok.decode([tokens[at]])!r}"
                what += f" after {tok.decode(tokens[:at])[-40:]!r}"
            r["error"] = f"rejects the valid document: {what}"
        else:
            us = [x / 1e3 for x in masks]
            r.update(first_mask_us=us[0], mask_mean_us=sum(us) / len(us), mask_p99_us=_p99(us),
                     advance_mean_us=sum(advances) / len(advances) / 1e3,
                     doc_ms=(sum(masks) + sum(advances)) / 1e6)  # fmt: skip
            m.reset()  # the same document again: what the first pass left warm
            _, masks, _ = _follow(lib, m, tokens, eos, buf, timed=True)
            r["warm_mask_mean_us"] = sum(masks) / len(masks) / 1e3
        if hasattr(lib, "note"):
            r["note"] = lib.note(SCHEMAS[name])
        verdicts = []
        for bad in invalid_docs(name, n_invalid, seed):
            ids = tok.encode(bad["text"], add_special_tokens=False)
            try:
                at, _, _ = _follow(lib, lib.matcher(compiled), ids, eos, buf, timed=False)
            except Exception as e:
                verdicts.append(f"error: {type(e).__name__}: {e}"[:200])
                continue
            verdicts.append("accepted" if at is None else "rejected")
        r["invalid"] = verdicts
        print("SCHEMA " + json.dumps(r), flush=True)
    print("RESULT " + json.dumps({"done": True}), flush=True)


# ---------------------------------------------------------------------------------------------
# driver


def _lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def run_one(lib: str, tok_name: str, schemas: list[str], args, env: dict) -> dict:
    """One library on one tokenizer: ``{"setup": ..., "schemas": {name: ...}}``. A worker that
    sends nothing for ``--schema-timeout`` seconds is killed, the schema it was on gets an error
    saying so, and a new worker takes the schemas after it (its setup is not counted again)."""
    res: dict = {"setup": None, "schemas": {}, "wall_s": 0.0}
    t0 = time.perf_counter()
    todo = list(schemas)
    while todo:
        stage = "setup"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", lib,
               "--tokenizer", tok_name, "--schemas", *todo,
               "--invalid", str(args.invalid), "--seed", str(args.seed)]  # fmt: skip
        with tempfile.TemporaryFile("w+") as err:
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            q: queue.Queue = queue.Queue()
            threading.Thread(target=_lines, args=(p.stdout, q), daemon=True).start()
            status = None
            while status is None:
                try:
                    line = q.get(timeout=args.schema_timeout)
                except queue.Empty:
                    p.kill()
                    status = f"no answer in {args.schema_timeout:.0f} s"
                    break
                if line is None:
                    p.wait()
                    err.seek(0)
                    tail = " | ".join(err.read().strip().splitlines()[-3:])
                    status = f"exit {p.returncode}: {tail}"
                    break
                head, _, body = line.strip().partition(" ")
                if head == "SETUP":
                    res["setup"] = res["setup"] or json.loads(body)
                    stage = "compile"
                elif head == "COMPILED":
                    stage = "masks or cross-check"
                elif head == "SCHEMA":
                    r = json.loads(body)
                    res["schemas"][r["schema"]] = r
                    todo.remove(r["schema"])
                    stage = "compile"
                elif head == "RESULT":
                    body = json.loads(body)
                    if "error" in body:
                        res["error"] = body["error"]
                        todo = []
                    status = "done"
            p.wait()
        if status != "done" and todo:
            stuck = todo.pop(0)
            res["schemas"][stuck] = {"schema": stuck, "error": f"{status} ({stage})",
                                     "timed_out": status.startswith("no answer")}  # fmt: skip
    res["wall_s"] = time.perf_counter() - t0
    return res


def _r(x) -> str:
    """A ratio: two decimals, whole numbers from 100 on."""
    return fmt(x, "d" if x is not None and x >= 100 else ".2f")


def _spread(rs: list[float]) -> str:
    if not rs:
        return "-"
    return _r(rs[0]) if len(rs) == 1 else f"{_r(min(rs))}-{_r(max(rs))}"


def _value(run: dict, key: str, schema: str | None):
    if schema is None:
        return (run["setup"] or {}).get(key)
    return (run["schemas"].get(schema) or {}).get(key)


def _ratios(runs: dict, lib: str, key: str, schema: str | None = None) -> tuple:
    """Per-repeat ``key`` of lib / of llguidance (repeat i against repeat i): median, spread."""
    base = runs.get("llguidance")
    if base is None or lib == "llguidance":
        return None, "-"
    pairs = zip(runs[lib], base, strict=True)
    rs = [x for x in (ratio(_value(a, key, schema), _value(b, key, schema)) for a, b in pairs)
          if x is not None]  # fmt: skip
    return median(rs), _spread(rs)


def summarize(tok_name: str, runs: dict, args) -> tuple[dict, list[str]]:
    """The report's tables for one tokenizer, and their numbers."""
    libs = list(runs)
    summary: dict = {"setup": {}, "schemas": {}, "crosscheck": {}}
    lines = [f"### {tok_name}: {TOKENIZERS[tok_name].name}", "",
             "| library | import s | setup s | setup x llg | spread | first use ms |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for lib in libs:
        ok = [r for r in runs[lib] if r["setup"]]
        if not ok:
            err = next((r.get("error") for r in runs[lib] if r.get("error")), "no setup")
            lines.append(f"| {lib} | ERROR: {err} | | | | |")
            continue
        imp = median([r["setup"]["import_s"] for r in ok])
        setup = median([r["setup"]["setup_s"] for r in ok])
        first = median([r["setup"]["first_use_ms"] for r in ok])
        rm, rs = _ratios(runs, lib, "setup_s")
        summary["setup"][lib] = {"import_s": imp, "setup_s": setup, "ratio": rm, "spread": rs,
                                 "first_use_ms": first}  # fmt: skip
        lines.append(
            f"| {lib} | {fmt(imp, '.2f')} | {fmt(setup, '.2f')} | {_r(rm)} | {rs} "
            f"| {fmt(first, '.1f')} |"
        )
    lines += ["", "| schema | library | compile ms | x llg | spread | 1st mask us | mask us | "
              "p99 us | x llg | spread | warm mask us | advance us | doc ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = ("compile_ms", "first_mask_us", "mask_mean_us", "mask_p99_us", "warm_mask_mean_us",
            "advance_mean_us", "doc_ms")  # fmt: skip
    notes = []
    for schema in args.schemas:
        found = [r["schemas"][schema] for lib in libs for r in runs[lib] if schema in r["schemas"]]
        n_tok = next((x["tokens"] for x in found if x.get("tokens")), None)
        label = f"{schema} ({n_tok} tok)" if n_tok else schema
        summary["schemas"][schema] = {"tokens": n_tok}
        notes += sorted({f"- {schema}: {x['note']}" for x in found if x.get("note")})
        for lib in libs:
            mine = [r["schemas"][schema] for r in runs[lib] if schema in r["schemas"]]
            errs = [x["error"] for x in mine if "error" in x]
            if errs or not mine:
                err = errs[0] if errs else "not run"
                summary["schemas"][schema][lib] = {"error": err}
                lines.append(f"| {label} | {lib} | ERROR: {err.replace('|', '/')} |" + " |" * 10)
                continue
            med = {k: median([x.get(k) for x in mine]) for k in keys}
            cm, cs = _ratios(runs, lib, "compile_ms", schema)
            mm, ms = _ratios(runs, lib, "mask_mean_us", schema)
            summary["schemas"][schema][lib] = {**med, "runs": len(mine), "compile_ratio": cm,
                                               "compile_spread": cs, "mask_ratio": mm,
                                               "mask_spread": ms}  # fmt: skip
            n = len(mine)
            who = lib if n == args.repeats else f"{lib} ({n} run{'s' if n > 1 else ''})"
            lines.append(
                f"| {label} | {who} | {fmt(med['compile_ms'], '.1f')} | {_r(cm)} | {cs} "
                f"| {fmt(med['first_mask_us'], 'd')} | {fmt(med['mask_mean_us'], '.1f')} "
                f"| {fmt(med['mask_p99_us'], 'd')} | {_r(mm)} | {ms} "
                f"| {fmt(med['warm_mask_mean_us'], '.1f')} | {fmt(med['advance_mean_us'], '.1f')} "
                f"| {fmt(med['doc_ms'], '.2f')} |"
            )
    if notes:
        lines += ["", *notes]
    lines += ["", "cross-check (invalid documents rejected):", "",
              "| schema | invalid docs | " + " | ".join(libs) + " | all reject |",
              "|---|---|" + "---|" * len(libs) + "---|"]  # fmt: skip
    disagreements = []
    for schema in args.schemas:
        bad = invalid_docs(schema, args.invalid, args.seed)
        verdicts = {lib: next((r["schemas"][schema]["invalid"] for r in runs[lib]
                               if "invalid" in r["schemas"].get(schema, {})), None)
                    for lib in libs}  # fmt: skip
        cells = ["-" if v is None else f"{sum(x == 'rejected' for x in v)}/{len(v)}"
                 for v in verdicts.values()]  # fmt: skip
        agree = 0
        for i, b in enumerate(bad):
            said = {lib: v[i] for lib, v in verdicts.items() if v is not None}
            if said and all(x == "rejected" for x in said.values()):
                agree += 1
                continue
            who = ", ".join(f"{lib} {x}" for lib, x in said.items() if x != "rejected")
            text = b["text"] if len(b["text"]) < 80 else b["text"][:60] + " ..."
            disagreements.append(f"- {schema}, {b['kind']} at {b['where']}: {who} (`{text}`)")
        summary["crosscheck"][schema] = {"docs": bad, "verdicts": verdicts, "all_reject": agree}
        kinds = ", ".join(sorted({b["kind"] for b in bad}))
        lines.append(f"| {schema} | {len(bad)} ({kinds}) | " + " | ".join(cells)
                     + f" | {agree}/{len(bad)} |")  # fmt: skip
    if disagreements:
        lines += ["", "invalid documents that not every library rejects:", *disagreements]
    return summary, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", nargs="+", choices=list(TOKENIZERS), default=list(TOKENIZERS))
    ap.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    ap.add_argument("--schemas", nargs="+", choices=list(SCHEMAS), default=list(SCHEMAS))
    ap.add_argument("--repeats", type=int, default=3, help="runs per library (order rotates)")
    ap.add_argument("--invalid", type=int, default=8, help="invalid documents per schema")
    ap.add_argument("--seed", type=int, default=0, help="the invalid documents' RNG")
    ap.add_argument(
        "--schema-timeout",
        type=float,
        default=25,
        help="seconds a worker may take for its setup or for one schema",
    )
    ap.add_argument(
        "--slow",
        type=float,
        default=5,
        help="a schema that compiles slower (seconds) runs in the first repeat only",
    )
    ap.add_argument("--out", default=str(RESULTS), help="JSON results file")
    ap.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", choices=list(TOKENIZERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    check_docs()
    if args.worker:
        return worker(args.worker, args.tokenizer, args.schemas, args.invalid, args.seed)

    libs = []
    for lib in args.libs:
        if importlib.util.find_spec(MODULES[lib]) is None:
            print(f"{lib} is not installed, left out: pip install {lib} "
                  "(a benchmark-only dependency, not in pyproject.toml)")  # fmt: skip
        else:
            libs.append(lib)
    if not libs:
        raise SystemExit("none of the libraries is installed")
    versions = {lib: md.version(lib) for lib in libs}
    env = bench_env()
    results: dict = {"args": vars(args), "versions": versions, "machine": platform.machine(),
                     "python": platform.python_version(), "tokenizers": {}}  # fmt: skip
    report: list[str] = []
    for tok_name in args.tokenizers:
        runs: dict = {lib: [] for lib in libs}
        # timed out, or compiled slower than --slow: measured in the first repeat only
        once: dict = {lib: set() for lib in libs}
        for rep in range(args.repeats):
            order = libs[rep % len(libs) :] + libs[: rep % len(libs)]
            for lib in order:
                print(f"[{tok_name}] repeat {rep + 1}/{args.repeats}: {lib} ...", file=sys.stderr)
                todo = [s for s in args.schemas if s not in once[lib]]
                empty = {"setup": None, "schemas": {}, "wall_s": 0.0}
                r = run_one(lib, tok_name, todo, args, env) if todo else empty
                for name, x in r["schemas"].items():
                    if x.get("timed_out") or (x.get("compile_ms") or 0) > args.slow * 1e3:
                        once[lib].add(name)
                errors = [f"{n}: {x['error']}" for n, x in r["schemas"].items() if "error" in x]
                errors += [r["error"]] if "error" in r else []
                print(f"  {len(todo)} schemas in {r['wall_s']:.1f} s" + "".join(
                    f"\n  ERROR {e}" for e in errors), file=sys.stderr, flush=True)  # fmt: skip
                runs[lib].append(r)
        summary, lines = summarize(tok_name, runs, args)
        results["tokenizers"][tok_name] = {"folder": str(TOKENIZERS[tok_name]), "runs": runs,
                                           "summary": summary}  # fmt: skip
        report += lines + [""]
    head = (
        f"## structured output: {', '.join(f'{k} {v}' for k, v in versions.items())}; "
        f"median of {args.repeats} runs per library (order rotating); x llg = library / "
        "llguidance (median of per-repeat ratios), spread = their min-max; mask us = mean "
        "microseconds per mask over the valid document's tokens + the final eos mask; warm = "
        "the same document again after a reset; doc ms = masks + advances of the document"
    )
    print("\n" + "\n".join([head, "", *report]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
