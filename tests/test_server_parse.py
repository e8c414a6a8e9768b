"""The answer parser of the chat API: reasoning, content and tool calls from streamed text."""

from __future__ import annotations

import json

import pytest

from mlxllm.server.parse import OutputParser


def _run(parser, deltas):
    out = []
    for d in deltas:
        out += parser.feed(d)
    out += parser.finish()
    merged = []  # join consecutive pieces of one kind
    for kind, value in out:
        if merged and merged[-1][0] == kind and kind != "tool_call":
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


CALL = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
TEXT = "Sure.<think>hm, <b> </think>Let me check." + CALL


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_markers_split_across_deltas(size):
    deltas = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
    got = _run(OutputParser(tools=True), deltas)
    assert got == [
        ("content", "Sure."),
        ("reasoning", "hm, <b> "),
        ("content", "Let me check."),
        ("tool_call", {"name": "f", "arguments": json.dumps({"x": 1})}),
    ]


def test_thinking_opened_by_the_template_and_bad_calls_stay_text():
    # R1's template ends the prompt with "<think>\n": the answer starts inside it
    got = _run(OutputParser(thinking=True, tools=False), ["plan", "</thi", "nk>answer"])
    assert got == [("reasoning", "plan"), ("content", "answer")]
    bad = "<tool_call>{not json}</tool_call>"
    assert _run(OutputParser(tools=True), [bad]) == [("content", bad)]
    unclosed = 'x <tool_call>{"name": "f"'
    assert "".join(v for _, v in _run(OutputParser(tools=True), [unclosed])) == unclosed
    # without tools a tool-call marker is plain text
    assert _run(OutputParser(tools=False), ["a<tool_call>b"]) == [("content", "a<tool_call>b")]


def test_bare_json_call_when_tools_were_offered():
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert _run(OutputParser(tools=True), [" ", call[:10], call[10:]]) == [
        ("tool_call", {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})})
    ]
    assert _run(OutputParser(tools=True), ['{"a": 1} is JSON']) == [("content", '{"a": 1} is JSON')]
    assert _run(OutputParser(tools=False), [call]) == [("content", call)]


ARGS = {"city": "Paris", "days": 2}


@pytest.mark.parametrize(
    "answer",
    [
        # DeepSeek-V3 / R1
        "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        # DeepSeek-V3.1 and later
        "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris", "days": 2}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        # Mistral
        'Let me look.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}]',
        # Llama 3.1+
        'Let me look.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
        '"days": 2}}',
    ],
)
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_each_family_tool_call_format(answer, size):
    deltas = [answer[i : i + size] for i in range(0, len(answer), size)]
    got = _run(OutputParser(tools=True), deltas)
    assert got[0] == ("content", "Let me look.")
    assert got[1:] == [("tool_call", {"name": "get_weather", "arguments": json.dumps(ARGS)})]


def test_broken_family_calls_come_back_as_text():
    deepseek = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>oops<｜tool▁calls▁end｜>"
    for text in ["[TOOL_CALLS] [{bad", "<|python_tag|>print(1)", deepseek]:
        assert "".join(v for _, v in _run(OutputParser(tools=True), [text])) == text
