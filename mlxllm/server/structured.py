"""Structured output: JSON (any object, or a JSON schema) enforced while decoding, by llguidance.

Why llguidance (``benchmarks/structured.py`` measures it against xgrammar and outlines-core on
five schemas with Qwen's 152K vocabulary): a schema compiles in 1-5 ms (xgrammar 5-50 ms,
outlines-core seconds to minutes), so a request with a new schema starts at once; its masks take
16-28 us per token on most schemas (xgrammar is faster per token, 4-17 us, but imports torch),
up to ~200 us mean inside ``maxLength`` strings; it enforces numeric bounds (outlines-core
ignores them); it needs nothing beyond its own wheel; and llama.cpp and vLLM ship it for the
same job. ``oneOf`` (pydantic's discriminated unions) is read as ``anyOf`` (``coerce_one_of``).

``JsonConstraint`` is a logits processor for the engine (``p(history, logits) -> logits``):
it feeds the tokens generated so far to the matcher and masks every token the grammar does not
allow next (eos only once the value is complete).
"""

from __future__ import annotations

import json

import numpy as np

from mlxllm.server.openai import ApiError

FIXED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
         "coerce_one_of": True}  # fmt: skip
_TOKENIZERS: dict = {}  # one LLTokenizer per (tokenizer, vocab): ~1 s to build


def _ll_tokenizer(tokenizer, vocab: int):
    import llguidance

    key = (id(tokenizer), vocab)
    if key not in _TOKENIZERS:
        backend = getattr(tokenizer._backend, "tok", None)
        if backend is None:
            raise ApiError(400, "structured output needs a tokenizer.json tokenizer")
        eos = sorted(tokenizer.eos_token_ids)
        _TOKENIZERS[key] = (tokenizer, llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab,
                                                              eos_token=eos))  # fmt: skip
    return _TOKENIZERS[key][1]


def schema_of(response_format) -> dict | None:
    """OpenAI's ``response_format`` -> a JSON schema (None: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be an object",
                           "response_format")  # fmt: skip
        return schema
    raise ApiError(400, f"response_format type {kind!r}: use text, json_object or json_schema",
                   "response_format")  # fmt: skip


def call_schema(tools: list[dict], names: list[str]) -> dict:
    """The answer of a forced tool call: ``{"name": one of names, "arguments": its parameters}``
    (the bare call object the answer parser reads as a tool call), as a JSON schema."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
              for t in tools}  # fmt: skip
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ApiError(400, f"tool_choice names {unknown[0]!r}, which is not among the tools",
                       "tool_choice")  # fmt: skip
    one = [{"type": "object", "additionalProperties": False,
            "required": ["name", "arguments"],
            "properties": {"name": {"const": n}, "arguments": params[n]}}
           for n in names]  # fmt: skip
    return one[0] if len(one) == 1 else {"anyOf": one}


class JsonConstraint:
    """Logits processor that keeps the answer inside ``schema`` (see module doc)."""

    def __init__(self, schema: dict, tokenizer, vocab: int, prompt_len: int):
        import llguidance

        # fixed separators, no free whitespace: a model that pads with newlines would
        # otherwise run into max_tokens with the value still open
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=FIXED)
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab), grammar, log_level=0)
        if self.matcher.is_error():
            raise ApiError(400, f"the JSON schema cannot be used: {self.matcher.get_error()}",
                           "response_format")  # fmt: skip
        self.vocab, self.start, self.fed = vocab, prompt_len, 0

    def __call__(self, history: list[int], logits):
        import mlx.core as mx

        new = history[self.start + self.fed :]
        if new:
            self.matcher.consume_tokens(new)
            self.fed += len(new)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        # bit i of byte j is token 8j + i
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab]
        return mx.where(mx.array(allowed.astype(bool)), logits, -mx.inf)
