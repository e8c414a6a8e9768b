"""Split a chat answer's text, as it streams, into reasoning, content and tool calls.

- Reasoning: ``<think>...</think>`` (DeepSeek-R1, QwQ, Qwen3). Templates that open the block
  in the prompt (R1's ends with ``<think>\\n``) start the answer inside it: ``thinking=True``.
- Tool calls, in the format of each family (``FORMATS``): Qwen2.5/Qwen3/QwQ
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; DeepSeek-V3/R1
  ``<｜tool▁calls▁begin｜>...`` blocks; Mistral ``[TOOL_CALLS] [...]``; Llama 3.1+
  ``<|python_tag|>{...}`` or a bare JSON object. Small Qwen models also answer a tool prompt
  with the bare object: when tools were offered and the answer starts with ``{``, it is held
  until the end and read as a call if it is one. A call whose body does not parse is handed
  back as plain content, never dropped.

Markers may arrive split across deltas: text that could be the start of a marker is held back
until the next delta settles it.
"""

from __future__ import annotations

import json

from mlxllm.generation.stream import stop_hold

THINK, END_THINK = "<think>", "</think>"
TOOL, END_TOOL = "<tool_call>", "</tool_call>"


class OutputParser:
    """``feed(delta)`` / ``finish()`` -> ``[(kind, value)]`` with kind ``"reasoning"``,
    ``"content"`` (text) or ``"tool_call"`` (``{"name": str, "arguments": str}``, arguments as
    a JSON string, as the OpenAI API carries them)."""

    def __init__(self, thinking: bool = False, tools: bool = True):
        # "lead": tools offered, nothing but whitespace yet; "bare": an answer that starts
        # with "{" (a tool call without tags?), held to the end
        self.state = "think" if thinking else ("lead" if tools else "content")
        self.tools = tools
        self.buf = ""
        self.opened = ""  # the tool format's start marker while in "tool"

    def _markers(self) -> tuple[str, ...]:
        if self.state == "think":
            return (END_THINK,)
        if self.state == "tool":
            end = FORMATS[self.opened][0]
            return (end,) if end else ()
        return (THINK, *FORMATS) if self.tools else (THINK,)

    def feed(self, delta: str) -> list[tuple[str, object]]:
        self.buf += delta
        out: list[tuple[str, object]] = []
        if self.state == "lead":
            lead = self.buf.lstrip()
            if not lead:
                return out
            self.state = "bare" if lead.startswith("{") else "content"
        if self.state == "bare":
            return out
        while True:
            markers = self._markers()
            hits = [(self.buf.find(m), m) for m in markers if m in self.buf]
            if not hits:
                break
            at, marker = min(hits)
            before, self.buf = self.buf[:at], self.buf[at + len(marker) :]
            self._close(before, marker, out)
        if self.state != "tool":  # tool bodies wait for their end marker (or the end)
            keep = stop_hold(self.buf, self._markers())
            ready, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            if ready:
                out.append(("reasoning" if self.state == "think" else "content", ready))
        return out

    def _calls(self, body: str, end: str, out: list) -> None:
        calls = FORMATS[self.opened][1](body)
        if calls:
            out.extend(("tool_call", c) for c in calls)
        else:  # not a call after all: the text as the model wrote it
            out.append(("content", self.opened + body + end))
        self.state = "content"

    def _close(self, before: str, marker: str, out: list) -> None:
        if self.state == "think":
            if before:
                out.append(("reasoning", before))
            self.state = "content"
        elif self.state == "tool":
            self._calls(before, marker, out)
        else:
            if before:
                out.append(("content", before))
            self.state, self.opened = ("think", "") if marker == THINK else ("tool", marker)

    def finish(self) -> list[tuple[str, object]]:
        rest, self.buf = self.buf, ""
        out: list[tuple[str, object]] = []
        if self.state == "tool":
            if FORMATS[self.opened][0] is None:  # formats that run to the end of the answer
                self._calls(rest, "", out)
            else:  # never closed: what the model wrote, as text
                out.append(("content", self.opened + rest))
            return out
        if not rest:
            return out
        if self.state == "bare":
            call = _tool_call(rest.strip())
            return [("tool_call", call)] if call else [("content", rest)]
        if self.state == "lead":
            return [("content", rest)]
        return [("reasoning" if self.state == "think" else "content", rest)]


def _tool_call(body) -> dict | None:
    """``{"name": ..., "arguments" | "parameters": {...}}`` (text or parsed) -> a call."""
    obj = body
    if isinstance(body, str):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            json.loads(args)
        except json.JSONDecodeError:
            return None
        return {"name": obj["name"], "arguments": args}
    return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def _one(body: str) -> list[dict] | None:
    call = _tool_call(body.strip())
    return [call] if call else None


def _json_list(body: str) -> list[dict] | None:
    """Mistral: ``[{"name": ..., "arguments": {...}}, ...]`` (or one object)."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_tool_call(o) for o in items]
    return calls if calls and all(calls) else None


def _python_tag(body: str) -> list[dict] | None:
    """Llama 3.1+: one JSON call, or several separated by ``;``."""
    calls = [_tool_call(p.strip()) for p in body.strip().split(";") if p.strip()]
    return calls if calls and all(calls) else None


DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def _deepseek(body: str) -> list[dict] | None:
    """DeepSeek-V3/R1: ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
    <｜tool▁call▁end｜>`` per call (V3.1 and later: ``NAME<｜tool▁sep｜>ARGS``)."""
    calls = []
    for piece in body.split(DS_CALL)[1:]:
        piece = piece.split(DS_CALL_END)[0]
        if DS_SEP not in piece:
            return None
        head, rest = piece.split(DS_SEP, 1)
        if head.strip() == "function":  # V3 / R1: the name, then the arguments in a code block
            name, _, args = rest.partition("\n")
            args = args.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
        else:
            name, args = head, rest
        call = _tool_call({"name": name.strip(), "arguments": args.strip() or "{}"})
        if call is None:
            return None
        calls.append(call)
    return calls or None


# start marker -> (end marker or None: to the end of the answer, parser of the body)
FORMATS = {
    TOOL: (END_TOOL, _one),  # Qwen2.5, Qwen3, QwQ (Hermes style)
    "<｜tool▁calls▁begin｜>": ("<｜tool▁calls▁end｜>", _deepseek),  # DeepSeek-V3, R1
    "[TOOL_CALLS]": (None, _json_list),  # Mistral
    "<|python_tag|>": (None, _python_tag),  # Llama 3.1+
}
