"""The Anthropic Messages API's fields -> engine requests, and its message / event objects.

``POST /v1/messages``: ``system`` (a string or text blocks), ``messages`` with string or text
block content, ``max_tokens`` (required, as Anthropic requires it), ``stop_sequences``,
``temperature``, ``top_p``, ``top_k``; streaming sends Anthropic's event sequence
(``message_start``, ``content_block_start``, ``content_block_delta``..., ``content_block_stop``,
``message_delta``, ``message_stop``). Errors use Anthropic's shape (``{"type": "error",
"error": {"type", "message"}}``).
"""

from __future__ import annotations

import json

from mlxllm.engine import Request
from mlxllm.errors import InvalidArgument
from mlxllm.generation.stream import encode_prompt
from mlxllm.server.openai import ApiError, _number, new_id

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 413:
               "request_too_large", 429: "rate_limit_error"}  # fmt: skip


def error_body(e: ApiError) -> dict:
    kind = ERROR_TYPES.get(e.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def _blocks_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "text"):
                raise ApiError(400, f"{where}: only text blocks are supported", where)
            out.append(str(block.get("text", "")))
        return "".join(out)
    raise ApiError(400, f"{where} must be a string or a list of text blocks", where)


def messages_request(body: dict, tokenizer, max_cap: int) -> tuple[Request, list[str]]:
    """``POST /v1/messages`` body -> (engine request, stop sequences)."""
    if "max_tokens" not in body:
        raise ApiError(400, "'max_tokens' is required", "max_tokens")
    max_tokens = _number(body, "max_tokens", None, int, 1, max_cap)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    chat = []
    if body.get("system") is not None:
        chat.append({"role": "system", "content": _blocks_text(body["system"], "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant'", "messages")
        text = _blocks_text(m.get("content"), f"messages[{i}].content")
        chat.append({"role": m["role"], "content": text})
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop_sequences' must be a list of strings", "stop_sequences")
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template", "messages")
    try:
        ids = encode_prompt(tokenizer, chat, None, None)
    except InvalidArgument as e:
        raise ApiError(400, str(e), "messages") from None
    req = Request(
        ids,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 1.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0) or 1.0,
        top_k=_number(body, "top_k", 0, int, 0),
    )
    return req, stops


def stop_reason(ev, matched: str | None) -> str:
    if ev.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if matched is not None else "end_turn"


def usage(ev, output: int) -> dict:
    return {"input_tokens": ev.prompt_tokens - ev.cached_tokens, "output_tokens": output,
            "cache_read_input_tokens": ev.cached_tokens,
            "cache_creation_input_tokens": 0}  # fmt: skip


def message(rid, model, text, reason, matched, use) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": reason,
            "stop_sequence": matched, "usage": use}  # fmt: skip


def event(kind: str, **fields) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


def stream_start(rid, model, prompt_tokens, cached) -> list[str]:
    msg = {"id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0,
                     "cache_read_input_tokens": cached}}  # fmt: skip
    return [
        event("message_start", message=msg),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ]


def message_id() -> str:
    return new_id("msg")
