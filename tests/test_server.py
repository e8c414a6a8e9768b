"""``mlxllm serve``'s OpenAI API against a live server on 127.0.0.1 (uvicorn in a thread), with
the official ``openai`` client and the real SmolLM2 fixture. The oracle for every answer is the
same request run by ``mlxllm.generate`` alone (greedy)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import openai
import pytest
import uvicorn

from helpers import QWEN, SMOL, fixture_model
from mlxllm import generate, load
from mlxllm.server.app import make_app
from mlxllm.server.models import Models, Served
from mlxllm.server.openai import chat_request

KEY = "test-key"
QUESTION = [{"role": "user", "content": "Name three colours."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smol():
    return load(fixture_model(SMOL), dtype=mx.float32)


def _start(app):
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a thread, once it listens."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def _serve(name, model, tok, **kw):
    served = Served(name, model, tok, memory_budget=1 << 30, max_queued=32)
    url, srv, thread = _start(make_app(served, api_key=KEY, max_body_bytes=1 << 16))
    return url, served, srv, thread


@pytest.fixture(scope="module")
def server(smol):
    url, served, srv, thread = _serve("smol", *smol)
    yield url, served
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def _post(url, body: bytes, key=KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_streaming_and_not_equal_generate(client, smol):
    model, tok = smol
    want = generate(model, tok, QUESTION, max_tokens=24)
    got = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24,
                                         temperature=0)  # fmt: skip
    assert got.choices[0].message.content == want
    prompt = len(tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True),
                            add_special_tokens=False))  # fmt: skip
    assert got.usage.prompt_tokens == prompt and 0 < got.usage.completion_tokens <= 24
    stream = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and reasons.count(None) == len(reasons) - 1
    # the same conversation again comes from the prefix store
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= prompt - 1


def test_completions_stop_and_logprobs(client, smol):
    model, tok = smol
    want = generate(model, tok, "The capital of France is", max_tokens=16)
    got = client.completions.create(model="smol", prompt="The capital of France is",
                                    max_tokens=16, temperature=0)  # fmt: skip
    assert got.choices[0].text == want
    stop = want.strip().split()[1]
    cut = client.completions.create(model="smol", prompt="The capital of France is",
                                    max_tokens=16, temperature=0, stop=[stop])  # fmt: skip
    assert cut.choices[0].text == want[: want.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=6,
                                        temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top one


def test_sixteen_streams_equal_alone_while_four_clients_leave(client, server, smol):
    """16 streaming clients at once, each answer equal to the request alone (greedy), while 4
    more clients hang up after two chunks; afterwards no slot is left busy."""
    model, tok = smol
    subjects = ["cats", "rain", "maps", "tea", "ships", "bees", "snow", "clocks", "bread",
                "stars", "trains", "moss", "kites", "salt", "owls", "glass"]  # fmt: skip
    questions = [[{"role": "user", "content": f"One sentence about {s}."}] for s in subjects]

    def ask(messages):
        stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                                temperature=0, stream=True)  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def leave(i):
        stream = client.chat.completions.create(model="smol", messages=questions[i],
                                                max_tokens=500, stream=True)  # fmt: skip
        for n, _ in enumerate(stream):
            if n == 2:
                break
        stream.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        gone = [pool.submit(leave, i) for i in range(4)]
        got = list(pool.map(ask, questions))
        for f in gone:
            f.result(timeout=120)
    assert time.perf_counter() - t0 < 240
    assert got == [generate(model, tok, q, max_tokens=16) for q in questions]
    _, served = server
    for _ in range(200):
        if not served.engine.busy:
            break
        time.sleep(0.05)
    assert not served.engine.busy and not served.engine.rows


def test_models_health_auth_and_bad_requests(client, server):
    url, served = server
    listed = client.models.list().data
    assert listed[0].id == "smol" and listed[0].model_extra["loaded"] is True
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    chat = url + "/v1/chat/completions"
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"messages": []}).encode(), 400, "'messages'"),
        (json.dumps({"messages": QUESTION, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"messages": QUESTION, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"messages": QUESTION, "stop": 3}).encode(), 400, "'stop'"),
        (json.dumps({"messages": QUESTION, "pad": "x" * 70000}).encode(), 413, "bytes"),
    ]
    for body, status, words in cases:
        code, err = _post(chat, body)
        assert code == status and words in err["error"]["message"], (body[:40], code, err)
    code, _ = _post(chat, json.dumps({"messages": QUESTION}).encode(), key="wrong")
    assert code == 401
    # still serving, and nothing left running
    ok = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=4)
    assert ok.choices[0].message.content
    for _ in range(100):
        if not served.engine.busy:
            break
        time.sleep(0.05)
    assert not served.engine.busy and not served.engine.rows


def test_a_request_being_read_counts_as_arriving(server):
    """The engine sees a request the server is still reading (``Models.arrive``): an idle
    engine waits for it so that a burst is prefilled together. The count drops once the
    request is submitted, and after a bad request too."""
    url, served = server
    host, port = url.removeprefix("http://").split(":")
    count = served.engine.arrivals

    def send(body: bytes) -> bytes:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(head + body[:5])
            for _ in range(100):  # the route is waiting for the rest of the body
                if count() == 1:
                    break
                time.sleep(0.05)
            assert count() == 1
            sock.sendall(body[5:])
            answer = b""
            while part := sock.recv(65536):
                answer += part
        return answer

    ok = send(json.dumps({"messages": QUESTION, "max_tokens": 2}).encode())
    assert ok.startswith(b"HTTP/1.1 200") and count() == 0
    bad = send(b'{"messages": 5, "max_tokens": 2}')
    assert bad.startswith(b"HTTP/1.1 400") and count() == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(smol):
    """A server whose engine ignores eos (so nothing ends a request early): after the client
    hangs up, only the cancel can end its 2000-token request within the 5 s below."""
    url, served, srv, thread = _serve("smol", *smol)
    served.engine.eos = set()
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(model="smol", messages=QUESTION,
                                                max_tokens=2000, stream=True)  # fmt: skip
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        for _ in range(100):
            if not served.engine.rows and not served.engine.busy:
                break
            time.sleep(0.05)
        assert not served.engine.rows
        assert served.engine.stats.generated_tokens < 500
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_anthropic_messages_streaming_and_not(server, smol):
    import anthropic

    model, tok = smol
    url, _ = server
    client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)
    system = "You are terse."
    want = generate(model, tok, QUESTION, max_tokens=24, system=system)
    greedy = {"extra_body": {"temperature": 0}}  # (this client takes no temperature argument)
    got = client.messages.create(model="smol", max_tokens=24, system=system, messages=QUESTION,
                                 **greedy)  # fmt: skip
    assert got.content[0].text == want
    assert got.stop_reason in ("end_turn", "max_tokens") and got.usage.output_tokens > 0
    with client.messages.stream(model="smol", max_tokens=24, system=system, messages=QUESTION,
                                **greedy) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == want and final.content[0].text == want
    assert final.usage.cache_read_input_tokens > 0  # the same prompt: from the prefix store
    stop = want.split()[1]
    cut = client.messages.create(model="smol", max_tokens=24, system=system, messages=QUESTION,
                                 stop_sequences=[stop], **greedy)  # fmt: skip
    assert cut.content[0].text == want[: want.find(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="smol", max_tokens=0, messages=QUESTION)


PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "colour", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 3}}}  # fmt: skip
PEOPLE = ["a pirate", "a baker", "a queen", "a robot", "a child", "a farmer", "a poet", "a spy",
          "a nurse", "a wizard", "a pilot", "a judge", "a miner", "a monk", "a chef", "a diver",
          "a tailor", "a knight", "a clown", "a sailor"]  # fmt: skip


def test_json_schema_answers_always_parse_and_validate(client):
    """20 prompts at once (batched) with ``response_format`` json_schema: every answer parses
    and validates; ``json_object`` gives an object; without the constraint the same model does
    not answer in JSON (what makes the check able to fail)."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def ask(who, response_format=fmt):
        q = [{"role": "user", "content": f"Describe {who} as JSON with name, age, colour, tags."}]
        kw = {"response_format": response_format} if response_format else {}
        got = client.chat.completions.create(model="smol", messages=q, max_tokens=100,
                                             temperature=0.7, seed=len(who), **kw)  # fmt: skip
        return got.choices[0]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, PEOPLE))
    for choice in answers:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert choice.finish_reason == "stop"
    assert isinstance(json.loads(ask("a cat", {"type": "json_object"}).message.content), dict)
    # pydantic's discriminated unions come as oneOf
    pet = {"type": "object", "additionalProperties": False, "required": ["kind", "x"]}
    one_of = {
        "type": "object",
        "required": ["pet"],
        "additionalProperties": False,
        "properties": {
            "pet": {
                "oneOf": [
                    dict(
                        pet,
                        properties={
                            "kind": {"const": "cat"},
                            "x": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                    ),
                    dict(pet, properties={"kind": {"const": "dog"}, "x": {"type": "boolean"}}),
                ]
            }
        },
    }
    fmt_one_of = {"type": "json_schema", "json_schema": {"name": "pet", "schema": one_of}}
    jsonschema.validate(json.loads(ask("a pet", fmt_one_of).message.content), one_of)
    free = [ask(who, None).message.content for who in PEOPLE[:4]]
    assert not all(_is_json(t) for t in free), free


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


CITY = {"type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 40}}}  # fmt: skip


def test_anthropic_structured_output_through_tools(server):
    """Anthropic's way: a forced tool (``tool_choice`` any / one tool) comes back as a
    ``tool_use`` block whose input follows the tool's ``input_schema``, streamed or not; and
    ``output_config.format`` json_schema constrains the text answer."""
    import anthropic
    import jsonschema

    url, _ = server
    client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)
    tools = [{"name": "record_person", "description": "Store a person", "input_schema": PERSON},
             {"name": "get_weather", "description": "Weather in a city",
              "input_schema": CITY}]  # fmt: skip
    ask = [{"role": "user", "content": "Tell me about a pirate."}]
    # greedy (Anthropic's default temperature is 1), and bounded strings: an answer cut by
    # max_tokens inside an open string is not a call (it comes back as text)
    greedy = {"extra_body": {"temperature": 0}}
    for choice in ({"type": "tool", "name": "record_person"}, {"type": "any"}):
        got = client.messages.create(model="smol", max_tokens=120, messages=ask, tools=tools,
                                     tool_choice=choice, **greedy)  # fmt: skip
        (block,) = got.content
        assert got.stop_reason == "tool_use" and block.type == "tool_use"
        schema = {t["name"]: t["input_schema"] for t in tools}[block.name]
        jsonschema.validate(block.input, schema)
        if choice["type"] == "tool":
            assert block.name == "record_person"
    with client.messages.stream(
        model="smol",
        max_tokens=120,
        messages=ask,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
        **greedy,
    ) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use" and final.content[-1].name == "get_weather"
    jsonschema.validate(final.content[-1].input, CITY)
    fmt = {"format": {"type": "json_schema", "schema": PERSON}}
    got = client.messages.create(model="smol", max_tokens=120, messages=ask,
                                 extra_body={"output_config": fmt, "temperature": 0})  # fmt: skip
    jsonschema.validate(json.loads(got.content[0].text), PERSON)
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model="smol", max_tokens=8, messages=ask, tools=tools,
                               tool_choice={"type": "tool", "name": "nope"})  # fmt: skip


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip


# Qwen3's switch, as its template reads it: thinking unless enable_thinking is false, which
# closes an empty think block in the prompt (this template also opens <think> itself, as R1's
# and QwQ's do, so the whole answer of a model that never closes it is reasoning)
THINKING_TEMPLATE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif -%}
{%- endif %}"""


def test_reasoning_goes_to_reasoning_content_and_thinking_blocks(smol):
    """A template that opens <think>: the answer is ``reasoning_content`` (OpenAI) and a
    thinking block (Anthropic); ``enable_thinking: false`` reaches the template, which closes
    the block, and the answer is plain content."""
    import copy

    import anthropic

    model, tok = smol
    tok = copy.copy(tok)
    tok.chat_template = THINKING_TEMPLATE
    want = generate(model, tok, QUESTION, max_tokens=16)
    assert "</think>" not in want
    url, _, srv, thread = _serve("smol-think", model, tok)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        got = client.chat.completions.create(model="smol-think", messages=QUESTION,
                                             max_tokens=16, temperature=0)  # fmt: skip
        message = got.choices[0].message
        assert message.model_extra["reasoning_content"] == want and not message.content
        off = client.chat.completions.create(
            model="smol-think",
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            extra_body={"enable_thinking": False},
        )
        assert off.choices[0].message.content
        assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
        req, _, info = chat_request({"messages": QUESTION, "enable_thinking": False}, tok, 100)
        assert tok.decode(req.prompt).endswith("<think>\n\n</think>\n\n")
        assert not info["thinking"]
        claude = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)
        msg = claude.messages.create(model="smol-think", max_tokens=16, messages=QUESTION,
                                     thinking={"type": "enabled", "budget_tokens": 1024},
                                     extra_body={"temperature": 0})  # fmt: skip
        assert [b.type for b in msg.content] == ["thinking"] and msg.content[0].thinking == want
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_tool_call_round_trip_with_qwen():
    """Qwen2.5-Coder calls the offered tool (parsed into tool_calls, in streaming too), and the
    tool's result goes back through its chat template into an answer."""
    model, tok = load(fixture_model(QWEN), dtype=mx.float32)
    url, _, srv, thread = _serve("qwen", model, tok)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        got = client.chat.completions.create(model="qwen", messages=ask, tools=[WEATHER],
                                             max_tokens=64, temperature=0)  # fmt: skip
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        stream = client.chat.completions.create(
            model="qwen", messages=ask, tools=[WEATHER], max_tokens=64, temperature=0, stream=True
        )
        deltas = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
            ("get_weather", {"city": "Paris"})
        ]
        follow = ask + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and raining"},
        ]
        answer = client.chat.completions.create(model="qwen", messages=follow, tools=[WEATHER],
                                                max_tokens=40, temperature=0)  # fmt: skip
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # the call and its result reach the model through its template (what the 0.5B model
        # makes of them is its own business: it tends to call again)
        req, _, _ = chat_request({"messages": follow, "tools": [WEATHER]}, tok, 100)
        prompt = tok.decode(req.prompt)
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
        assert "<tool_response>\n18 degrees and raining\n</tool_response>" in prompt
        assert answer.usage.prompt_tokens == len(req.prompt)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_a_full_queue_answers_429_with_retry_after(smol):
    """With the engine held (its thread stopped), one request waits in the queue of one; the
    next gets 429 with Retry-After; once the engine runs again the waiting one is answered."""
    model, tok = smol
    served = Served("smol", model, tok, memory_budget=1 << 30, max_queued=1)
    url, srv, thread = _start(make_app(served))
    served.engine.stop()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        waiting = ThreadPoolExecutor(1).submit(
            client.chat.completions.create, model="smol", messages=QUESTION, max_tokens=2
        )
        while len(served.engine._waiting) < 1:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2)
        assert err.value.response.headers["retry-after"] == "1"
        assert "max_queued=1" in err.value.message
        served.engine.start()
        assert waiting.result(timeout=60).choices[0].message.content is not None
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_a_request_past_its_timeout_is_cancelled(smol):
    """With the engine held, requests wait past the 1 s timeout: 504 (or a stream's error
    event), and once the engine runs again they are gone, not run."""
    model, tok = smol
    served = Served("smol", model, tok, memory_budget=1 << 30)
    url, srv, thread = _start(make_app(served, request_timeout=1.0))
    served.engine.stop()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        t = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=20)
        assert err.value.status_code == 504 and "request timeout of 1 s" in err.value.message
        assert time.perf_counter() - t < 10
        stream = client.chat.completions.create(model="smol", messages=QUESTION,
                                                max_tokens=20, stream=True)  # fmt: skip
        with pytest.raises(openai.APIError, match="request timeout of 1 s"):
            list(stream)  # the stream ends with the error event instead of waiting on
        served.engine.start()
        for _ in range(100):
            if not served.engine.busy:
                break
            time.sleep(0.05)
        assert not served.engine.busy and served.engine.stats.generated_tokens == 0
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_models_load_on_first_use_and_go_when_idle():
    """No default model: requests name folders; each loads once, both serve, an unknown name
    is a 404 that leaves the server serving, and idle models are unloaded after keep_alive."""
    models = Models(None, keep_alive=120.0, dtype=mx.float32, memory_budget=1 << 30)
    url, srv, thread = _start(make_app(models))
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    smol, qwen = str(fixture_model(SMOL)), str(fixture_model(QWEN))
    try:
        with pytest.raises(openai.BadRequestError, match="no default"):
            client.chat.completions.create(model="", messages=QUESTION, max_tokens=2)
        with pytest.raises(openai.NotFoundError, match="not found"):
            client.chat.completions.create(model="/no/such/model", messages=QUESTION,
                                           max_tokens=2)  # fmt: skip
        for name in (smol, qwen, smol):
            got = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=4,
                                                 temperature=0)  # fmt: skip
            assert got.model == name and got.choices[0].message.content
        loaded = [m.id for m in client.models.list().data if m.model_extra["loaded"]]
        assert sorted(loaded) == sorted([smol, qwen])
        # models loaded on first use see the requests being read too (an idle engine waits)
        assert [m.engine.arrivals() for m in models.loaded.values()] == [0, 0]
        models.keep_alive = 0.5  # idle from now on: both go at the next check (<= 5 s)
        for _ in range(150):
            if not models.loaded:
                break
            time.sleep(0.1)
        assert not models.loaded
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_unloading_counts_caches_not_only_weights(tmp_path):
    """Two models whose weights fit the limit together: once the first holds a stored
    conversation in its prefix store, loading the second unloads it (idle, least recently
    used); the limit counts caches too."""
    import asyncio

    from mlx.utils import tree_flatten

    from mlxllm.engine import Request

    folder = fixture_model(SMOL)
    other = tmp_path / "smol-copy"
    other.symlink_to(folder, target_is_directory=True)
    weights = 4 * sum(
        v.size for _, v in tree_flatten(load(folder, dtype=mx.float32)[0].parameters())
    )

    async def scenario():
        models = Models(None, keep_alive=120.0, dtype=mx.float32, memory_budget=1 << 30,
                        memory_limit=2 * weights + (4 << 20))  # fmt: skip
        try:
            first = await models.get(str(folder))
            assert first.held == first.nbytes == weights  # nothing cached yet
            prompt = first.tokenizer.encode("The history of the sea. " * 40)
            handle = first.engine.open(Request(prompt, max_tokens=4))
            _ = [ev async for ev in handle]
            assert first.engine.store.nbytes > 4 << 20
            await models.get(str(other))
            return list(models.loaded)
        finally:
            models.stop()

    assert asyncio.run(scenario()) == [str(other)]


@pytest.mark.parametrize("drafter", ["--draft-model", "--mtp-head"])
def test_mlxllm_serve_answers_and_ctrl_c_shuts_down_cleanly(smol, drafter, tmp_path):
    """The real command: `mlxllm serve MODEL --draft-model M` (or `--mtp-head FILE`) answers on
    127.0.0.1 (greedy: the text of plain decoding), and SIGINT (Ctrl-C) ends it with status 0
    and no traceback."""
    import signal
    import subprocess
    import sys

    from mlxllm.speculative import mtp_layer, save_head
    from mlxllm.speculative.train import model_metadata

    given = str(fixture_model(SMOL))
    if drafter == "--mtp-head":
        given = str(tmp_path / "head.safetensors")
        save_head(mtp_layer(smol[0]), given, model_metadata(smol[0]))
    port = _free_port()
    cmd = [sys.executable, "-m", "mlxllm.cli.main", "serve", str(fixture_model(SMOL)),
           "--port", str(port), "--dtype", "float32", drafter, given,
           "--num-draft", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)  # fmt: skip
        got = client.chat.completions.create(model=cmd[4], messages=QUESTION, max_tokens=12,
                                             temperature=0)  # fmt: skip
        assert got.choices[0].message.content == generate(*smol, QUESTION, max_tokens=12)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
