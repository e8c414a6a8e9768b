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
from mlxllm.errors import MlxllmError
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
                raise ApiError(400, f"{where}: only text blocks are supported here", where)
            out.append(str(block.get("text", "")))
        return "".join(out)
    raise ApiError(400, f"{where} must be a string or a list of content blocks", where)


def _turn(m, i: int) -> list[dict]:
    """One Anthropic message -> chat messages as templates read them: ``tool_use`` blocks
    become the assistant's ``tool_calls``, each ``tool_result`` a ``tool`` message; earlier
    ``thinking`` blocks are dropped (templates drop past reasoning too)."""
    where = f"messages[{i}].content"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant'", "messages")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": m["role"], "content": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content blocks", where)
    text, calls, results = [], [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(str(block.get("text", "")))
        elif kind == "tool_use" and m["role"] == "assistant":
            fn = {"name": block.get("name"), "arguments": block.get("input") or {}}
            calls.append({"type": "function", "id": block.get("id"), "function": fn})
        elif kind == "tool_result" and m["role"] == "user":
            body = block.get("content", "")
            body = body if isinstance(body, str) else _blocks_text(body, where)
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": body})  # fmt: skip
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise ApiError(400, f"{where}: block type {kind!r} is not supported", where)
    out = list(results)
    if text or calls or not results:
        msg = {"role": m["role"], "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _tools(tools) -> list[dict] | None:
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("name") for t in tools):
        raise ApiError(400, "'tools' must be a list of tools with a 'name'", "tools")
    out = []
    for t in tools:
        fn = {"name": t["name"], "description": t.get("description", ""),
              "parameters": t.get("input_schema") or {"type": "object"}}  # fmt: skip
        out.append({"type": "function", "function": fn})
    return out


def messages_request(body: dict, tokenizer, max_cap: int) -> tuple[Request, list[str], dict]:
    """``POST /v1/messages`` body -> (engine request, stop sequences, how to read the answer:
    ``{"thinking", "tools"}`` as for the chat API)."""
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
        chat.extend(_turn(m, i))
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop_sequences' must be a list of strings", "stop_sequences")
    tools, force = _tool_choice(body.get("tool_choice"), _tools(body.get("tools")))
    kwargs = {}
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        kwargs["enable_thinking"] = thinking["type"] == "enabled"  # Qwen3's template switch
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template", "messages")
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=tools,
                                             **kwargs)  # fmt: skip
    except MlxllmError as e:
        raise ApiError(400, str(e), "messages") from None
    req = Request(
        tokenizer.encode(text, add_special_tokens=False),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 1.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0) or 1.0,
        top_k=_number(body, "top_k", 0, int, 0),
    )
    info = {"thinking": text.rstrip().endswith("<think>"), "tools": tools, "force": force,
            "format": _output_format(body)}  # fmt: skip
    return req, stops, info


def _tool_choice(choice, tools):
    """``tool_choice`` -> (the tools to render, the names one of which must be called or None):
    ``auto`` (default), ``none`` (tools not shown), ``any``, or ``{"type": "tool", "name"}``."""
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if kind in (None, "auto"):
        return tools, None
    if kind == "none":
        return None, None
    if not tools:
        raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if kind == "any":
        return tools, [t["function"]["name"] for t in tools]
    if kind == "tool" and isinstance(choice.get("name"), str):
        return tools, [choice["name"]]
    raise ApiError(400, "'tool_choice' must be {\"type\": \"auto\" | \"none\" | \"any\"} or "
                   '{"type": "tool", "name": ...}', "tool_choice")  # fmt: skip


def _output_format(body: dict) -> dict | None:
    """Structured output: ``output_config.format`` or the older ``output_format``,
    ``{"type": "json_schema", "schema": {...}}`` -> the schema (None: free text)."""
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format")
    if fmt is None:
        return None
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
            and isinstance(fmt.get("schema"), dict)):  # fmt: skip
        raise ApiError(400, 'the output format must be {"type": "json_schema", "schema": {...}}',
                       "output_config")  # fmt: skip
    return fmt["schema"]


def content_blocks(parts) -> list[dict]:
    """Parser output -> Anthropic content blocks (consecutive pieces of one kind joined)."""
    blocks: list[dict] = []
    for kind, value in parts:
        if kind == "tool_call":
            blocks.append(tool_block(value))
            continue
        key, btype = ("thinking", "thinking") if kind == "reasoning" else ("text", "text")
        if blocks and blocks[-1]["type"] == btype:
            blocks[-1][key] += value
        else:
            blocks.append({"type": btype, key: value} | ({"signature": ""} if key == "thinking"
                                                          else {}))  # fmt: skip
    return blocks or [{"type": "text", "text": ""}]


def tool_block(call: dict) -> dict:
    return {"type": "tool_use", "id": new_id("toolu"), "name": call["name"],
            "input": json.loads(call["arguments"])}  # fmt: skip


def stop_reason(ev, matched: str | None, tool_use: bool = False) -> str:
    if tool_use:
        return "tool_use"
    if ev.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if matched is not None else "end_turn"


def usage(ev, output: int) -> dict:
    return {"input_tokens": ev.prompt_tokens - ev.cached_tokens, "output_tokens": output,
            "cache_read_input_tokens": ev.cached_tokens,
            "cache_creation_input_tokens": 0}  # fmt: skip


def message(rid, model, blocks, reason, matched, use) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": reason, "stop_sequence": matched,
            "usage": use}  # fmt: skip


def event(kind: str, **fields) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


def stream_start(rid, model, prompt_tokens, cached) -> list[str]:
    msg = {"id": rid, "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0,
                     "cache_read_input_tokens": cached}}  # fmt: skip
    return [event("message_start", message=msg)]


def message_id() -> str:
    return new_id("msg")
