"""The OpenAI API's request fields -> engine requests, engine events -> its response objects.

Pure functions over dicts (no HTTP here): ``chat_request`` / ``completion_request`` check a
request body and return the prompt ids and the ``engine.Request``; the ``*_response`` and
``*_chunk`` builders shape what the routes send. A bad field raises ``ApiError`` (status, the
field, one line saying what it takes), which the app turns into OpenAI's error object.
"""

from __future__ import annotations

import json
import math
import time
import uuid

from mlxllm.engine import Request
from mlxllm.errors import InvalidArgument, MlxllmError
from mlxllm.generation.sample import check_sampling


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}  # fmt: skip


def _number(body: dict, name: str, default, kind=float, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be a {'whole ' if kind is int else ''}number", name)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"from {lo}" + (f" to {hi}" if hi is not None else " up")
        raise ApiError(400, f"'{name}' is {value}; use a value {span}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    return stop


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(400, f"{where}: only text content parts are supported", where)
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"{where} must be a string or a list of text parts", where)


def _sampling(body: dict, max_cap: int) -> dict:
    """The generation fields both endpoints share, checked."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, 512, int, 1, max_cap)
    top_logprobs = None
    if body.get("logprobs") is not None:
        logprobs = body["logprobs"]
        if isinstance(logprobs, bool):  # chat: a flag plus top_logprobs
            top_logprobs = _number(body, "top_logprobs", 0, int, 0, 20) if logprobs else None
        else:  # completions: the number of alternatives
            top_logprobs = _number(body, "logprobs", 0, int, 0, 5)
    req = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, int, 0),
        min_p=_number(body, "min_p", 0.0, float, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", None, float, 0.0),
        seed=_number(body, "seed", None, int, 0, 2**63 - 1),
        logprobs=top_logprobs,
    )
    if req["top_p"] == 0:
        raise ApiError(400, "'top_p' is 0; use a probability mass in (0, 1]", "top_p")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' other than 1 is not supported; send several requests", "n")
    try:
        check_sampling(req["temperature"], req["top_p"], req["top_k"], req["min_p"],
                       req["repetition_penalty"], req["seed"], req["max_tokens"])  # fmt: skip
    except InvalidArgument as e:
        raise ApiError(400, str(e)) from None
    return req


def _message(m, i: int) -> dict:
    """One chat message as templates read it: text content; an assistant's ``tool_calls`` with
    their arguments as objects (templates ``tojson`` them); a tool result's id and name."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "messages")
    out = {"role": m["role"], "content": _text(m.get("content"), f"messages[{i}]")}
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise ApiError(400, f"messages[{i}].tool_calls must be a list", "messages")
        out["tool_calls"] = []
        for c in calls:
            fn = dict((c or {}).get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass  # kept as the string the client sent
            out["tool_calls"].append({"type": "function", "id": c.get("id"), "function": fn})
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def chat_request(body: dict, tokenizer, max_cap: int) -> tuple[Request, list[str], dict]:
    """``POST /v1/chat/completions`` body -> (engine request, stop strings, how to read the
    answer: ``{"thinking": starts inside <think>, "tools": tools were offered}``)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    chat = [_message(m, i) for i, m in enumerate(messages)]
    tools = body.get("tools") or None
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) for t in tools)):  # fmt: skip
        raise ApiError(400, "'tools' must be a list of tool objects", "tools")
    tools, force = _tool_choice(body.get("tool_choice"), tools)
    kwargs = dict(body.get("chat_template_kwargs") or {})
    if body.get("enable_thinking") is not None:
        kwargs["enable_thinking"] = bool(body["enable_thinking"])
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=tools,
                                             **kwargs)  # fmt: skip
    except InvalidArgument as e:  # a template that refuses these messages
        raise ApiError(400, str(e), "messages") from None
    except MlxllmError as e:
        raise ApiError(400, str(e), "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    info = {"thinking": text.rstrip().endswith("<think>"), "tools": tools, "force": force}
    return Request(ids, **_sampling(body, max_cap)), _stops(body), info


def _tool_choice(choice, tools):
    """``tool_choice`` -> (the tools to render, the names one of which must be called or None):
    "auto" (default), "none" (tools not shown), "required", or one named function."""
    names = [((t.get("function") or {}).get("name")) for t in tools or []]
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None
    if not tools:
        raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if choice == "required":
        return tools, names
    if isinstance(choice, dict) and choice.get("type") == "function":
        return tools, [(choice.get("function") or {}).get("name")]
    raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or "
                   '{"type": "function", "function": {"name": ...}}', "tool_choice")  # fmt: skip


def completion_request(body: dict, tokenizer, max_cap: int) -> tuple[Request, list[str]]:
    """``POST /v1/completions`` body -> (engine request, stop strings)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return Request(ids, **_sampling(body, max_cap)), _stops(body)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def token_logprobs(tokenizer, ev) -> dict:
    """One token's entry of a chat ``logprobs.content`` list."""

    def entry(token_id, logprob):
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    out = entry(ev.token, ev.logprob)
    out["top_logprobs"] = [entry(t, lp) for t, lp in (ev.top_logprobs or [])]
    return out


def chat_response(rid, model, text, reason, logprobs, use) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": reason, "logprobs": logprobs}  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}  # fmt: skip


def chat_chunk(rid, model, delta: dict, reason=None, logprobs=None, use=None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "choices": [choice]}  # fmt: skip
    if use is not None:
        out["choices"], out["usage"] = [], use
    return out


def completion_response(rid, model, text, reason, logprobs, use) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}  # fmt: skip


def completion_chunk(rid, model, text, reason=None, use=None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    out = {"id": rid, "object": "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}  # fmt: skip
    if use is not None:
        out["choices"], out["usage"] = [], use
    return out
