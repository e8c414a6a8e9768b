"""Split a chat answer's text, as it streams, into reasoning, content and tool calls.

- Reasoning: ``<think>...</think>`` (DeepSeek-R1, QwQ, Qwen3). Templates that open the block
  in the prompt (R1's ends with ``<think>\\n``) start the answer inside it: ``thinking=True``.
- Tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, Qwen3, QwQ).
  Small Qwen models often answer a tool prompt with the bare JSON object, no tags: when tools
  were offered and the answer starts with ``{``, it is held until the end and read as a call if
  it is one. A call whose body is not that JSON is handed back as plain content, never dropped.

Markers may arrive split across deltas: text that could be the start of a marker is held back
until the next delta settles it.
"""

from __future__ import annotations

import json

THINK, END_THINK = "<think>", "</think>"
TOOL, END_TOOL = "<tool_call>", "</tool_call>"


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:n]):
                best = max(best, n)
                break
    return best


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

    def _markers(self) -> tuple[str, ...]:
        if self.state == "think":
            return (END_THINK,)
        if self.state == "tool":
            return (END_TOOL,)
        return (THINK, TOOL) if self.tools else (THINK,)

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
        if self.state != "tool":  # tool bodies wait for their end marker
            keep = _held(self.buf, self._markers())
            ready, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            if ready:
                out.append(("reasoning" if self.state == "think" else "content", ready))
        return out

    def _close(self, before: str, marker: str, out: list) -> None:
        if self.state == "think":
            if before:
                out.append(("reasoning", before))
            self.state = "content"
        elif self.state == "tool":
            call = _tool_call(before)
            out.append(("tool_call", call) if call else ("content", TOOL + before + END_TOOL))
            self.state = "content"
        else:
            if before:
                out.append(("content", before))
            self.state = "think" if marker == THINK else "tool"

    def finish(self) -> list[tuple[str, object]]:
        rest, self.buf = self.buf, ""
        if not rest:
            return []
        if self.state == "bare":
            call = _tool_call(rest.strip())
            return [("tool_call", call)] if call else [("content", rest)]
        if self.state == "lead":
            return [("content", rest)]
        if self.state == "tool":  # never closed: what the model wrote, as text
            return [("content", TOOL + rest)]
        return [("reasoning" if self.state == "think" else "content", rest)]


def _tool_call(body: str) -> dict | None:
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
