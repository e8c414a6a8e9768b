"""The HTTP layer: Starlette routes over the served models' engines, served by uvicorn.

Starlette rather than FastAPI: the routes validate their own fields into OpenAI's error format
(``openai.py``) and stream with plain async generators, so FastAPI's pydantic models and
OpenAPI pages would add a dependency and a second error format without doing any of the work.

The engine runs in its own thread (MLX work stays there); the routes only tokenize, submit and
read their request's ``Handle``. A client that goes away mid-stream cancels its request (the
handle's ``async for`` ends), which frees its rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mlxllm.engine import QueueFull
from mlxllm.server import anthropic as an
from mlxllm.server import openai as oa
from mlxllm.server import structured
from mlxllm.server.models import Models, Served
from mlxllm.server.openai import ApiError
from mlxllm.server.parse import OutputParser


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def make_app(
    models: Models | Served,
    api_key: str | None = None,
    max_body_bytes: int = 8 << 20,
    max_tokens_cap: int = 32768,
    request_timeout: float = 600.0,
) -> Starlette:
    """The ASGI app over ``models`` (or one ``Served`` model). ``api_key``: every route but
    ``/health`` needs ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``)."""
    if isinstance(models, Served):
        models = Models(default=models)

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if given != api_key:
            raise ApiError(401, "invalid or missing API key", kind="authentication_error")

    async def body_of(request: HttpRequest) -> dict:
        check_key(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"request body over {max_body_bytes} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def open_request(served, req, stops):
        try:
            return served.engine.open(req, tokenizer=served.tokenizer, stop=stops)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except ValueError as e:  # InvalidArgument: e.g. a prompt longer than the context
            raise ApiError(400, str(e)) from None

    def constrain(served, req, schema, info=None) -> None:
        """Structured output: the answer must be JSON following ``schema``, or (a forced tool
        call, ``info["force"]``) a call of one of those tools; the grammar's token mask is applied
        on every step. A template that opened ``<think>`` gets it closed first (a constrained
        answer has no reasoning)."""
        if info is not None and info.get("force"):
            schema = structured.call_schema(info["tools"], info["force"])
        if schema is None:
            return
        if info is not None and info["thinking"]:
            req.prompt = [
                *req.prompt,
                *served.tokenizer.encode("\n</think>\n\n", add_special_tokens=False),
            ]
            info["thinking"] = False
        vocab = served.model.config.vocab_size
        mask = structured.JsonConstraint(schema, served.tokenizer, vocab, len(req.prompt))
        req.logits_processors = (*req.logits_processors, mask)

    async def timed(handle):
        """The request's events until ``request_timeout``; past it the request is cancelled
        (its slot freed) and ``TimeoutError`` raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout
        events = handle.__aiter__()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.__anext__(), deadline - loop.time())
                except StopAsyncIteration:
                    return
                yield ev
        except (TimeoutError, asyncio.TimeoutError):
            raise TimeoutError(
                f"the request ran past the server's request timeout of {request_timeout:g} s; "
                "ask for fewer tokens or start the server with a longer --request-timeout"
            ) from None
        finally:
            await events.aclose()  # cancels the request if it is still running

    async def collect(handle):
        """All events of a request; ends with its final event."""
        try:
            events = [ev async for ev in timed(handle)]
        except TimeoutError as e:
            raise ApiError(504, str(e), kind="timeout_error") from None
        last = events[-1]
        if last.finish_reason == "error":
            raise ApiError(503, last.error or "generation failed")
        return events

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def chat(request: HttpRequest):
        with models.arrive():
            try:
                body = await body_of(request)
                served = await models.get(body.get("model"))
                req, stops, info = oa.chat_request(body, served.tokenizer, max_tokens_cap)
                constrain(served, req, structured.schema_of(body.get("response_format")), info)
                handle = open_request(served, req, stops)
            except ApiError as e:
                return _error(e)
        rid, model = oa.new_id("chatcmpl"), served.name
        want_lp = req.logprobs is not None
        parser = OutputParser(thinking=info["thinking"], tools=bool(info["tools"]))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _chat_stream(served, handle, parser, rid, model, want_lp, include_usage),
                media_type="text/event-stream",
            )
        try:
            events = await collect(handle)
        except ApiError as e:
            return _error(e)
        last = events[-1]
        parts = parser.feed("".join(e.text for e in events)) + parser.finish()
        message = {"role": "assistant", "content": None}
        text = "".join(v for k, v in parts if k == "content")
        reasoning = "".join(v for k, v in parts if k == "reasoning")
        calls = [_call(v, i) for i, (k, v) in enumerate(x for x in parts if x[0] == "tool_call")]
        if text or not calls:
            message["content"] = text
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        content = [oa.token_logprobs(served.tokenizer, e) for e in events if _answer(e)]
        use = oa.usage(last.prompt_tokens, _count(events), last.cached_tokens)
        lp = {"content": content} if want_lp else None
        reason = "tool_calls" if calls else _reason(last)
        out = oa.chat_response(rid, model, "", reason, lp, use)
        out["choices"][0]["message"] = message
        return JSONResponse(out)

    async def _chat_stream(served, handle, parser, rid, model, want_lp, include_usage):
        yield sse(oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        count, last, calls = 0, None, 0
        async for ev in _guard(timed(handle), oa_error):
            last = ev
            if ev.finish_reason == "error":
                failed = ApiError(503, getattr(ev, "error", None) or "generation failed")
                yield ev.line if isinstance(ev, _Failed) else oa_error(failed)
                return
            if _answer(ev):
                count += 1
            lp = None
            if want_lp and _answer(ev):
                lp = {"content": [oa.token_logprobs(served.tokenizer, ev)]}
            parts = parser.feed(ev.text) + (parser.finish() if ev.finish_reason else [])
            for kind, value in parts:
                if kind == "tool_call":
                    delta = {"tool_calls": [dict(_call(value, calls), index=calls)]}
                    calls += 1
                else:
                    delta = {"reasoning_content" if kind == "reasoning" else "content": value}
                yield sse(oa.chat_chunk(rid, model, delta, logprobs=lp))
                lp = None
            if lp:
                yield sse(oa.chat_chunk(rid, model, {"content": ""}, logprobs=lp))
            if ev.finish_reason is not None:
                yield sse(oa.chat_chunk(rid, model, {}, "tool_calls" if calls else _reason(ev)))
        if include_usage and last is not None:
            use = oa.usage(last.prompt_tokens, count, last.cached_tokens)
            yield sse(oa.chat_chunk(rid, model, {}, use=use))
        yield "data: [DONE]\n\n"

    async def completions(request: HttpRequest):
        with models.arrive():
            try:
                body = await body_of(request)
                served = await models.get(body.get("model"))
                req, stops = oa.completion_request(body, served.tokenizer, max_tokens_cap)
                constrain(served, req, structured.schema_of(body.get("response_format")))
                handle = open_request(served, req, stops)
            except ApiError as e:
                return _error(e)
        rid, model = oa.new_id("cmpl"), served.name
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _completion_stream(handle, rid, model, include_usage),
                media_type="text/event-stream",
            )
        try:
            events = await collect(handle)
        except ApiError as e:
            return _error(e)
        last = events[-1]
        lp = None
        if req.logprobs is not None:
            answer = [e for e in events if _answer(e)]
            tok = served.tokenizer
            lp = {
                "tokens": [tok.decode([e.token]) for e in answer],
                "token_logprobs": [e.logprob for e in answer],
                "top_logprobs": [
                    {tok.decode([t]): v for t, v in e.top_logprobs or []} for e in answer
                ],  # fmt: skip
            }
        use = oa.usage(last.prompt_tokens, _count(events), last.cached_tokens)
        text = "".join(e.text for e in events)
        return JSONResponse(oa.completion_response(rid, model, text, _reason(last), lp, use))

    async def _completion_stream(handle, rid, model, include_usage):
        count, last = 0, None
        async for ev in _guard(timed(handle), oa_error):
            last = ev
            if ev.finish_reason == "error":
                failed = ApiError(503, getattr(ev, "error", None) or "generation failed")
                yield ev.line if isinstance(ev, _Failed) else oa_error(failed)
                return
            count += _answer(ev)
            if ev.text or ev.finish_reason is not None:
                yield sse(oa.completion_chunk(rid, model, ev.text, _reason(ev)))
        if include_usage and last is not None:
            use = oa.usage(last.prompt_tokens, count, last.cached_tokens)
            yield sse(oa.completion_chunk(rid, model, "", use=use))
        yield "data: [DONE]\n\n"

    async def messages(request: HttpRequest):
        def fail(e: ApiError):
            retry = {"Retry-After": "1"} if e.status == 429 else None
            return JSONResponse(an.error_body(e), status_code=e.status, headers=retry)

        with models.arrive():
            try:
                body = await body_of(request)
                served = await models.get(body.get("model"))
                req, stops, info = an.messages_request(body, served.tokenizer, max_tokens_cap)
                constrain(served, req, info["format"], info)
                handle = open_request(served, req, stops)
            except ApiError as e:
                return fail(e)
        rid, model = an.message_id(), served.name
        parser = OutputParser(thinking=info["thinking"], tools=bool(info["tools"]))
        if body.get("stream"):
            return StreamingResponse(_messages_stream(handle, parser, rid, model),
                                     media_type="text/event-stream")  # fmt: skip
        try:
            events = await collect(handle)
        except ApiError as e:
            return fail(e)
        last = events[-1]
        blocks = an.content_blocks(parser.feed("".join(e.text for e in events)) + parser.finish())
        tool_use = any(b["type"] == "tool_use" for b in blocks)
        reason = an.stop_reason(last, handle.stop_matched, tool_use)
        use = an.usage(last, _count(events))
        return JSONResponse(an.message(rid, model, blocks, reason, handle.stop_matched, use))

    async def _messages_stream(handle, parser, rid, model):
        count, started, index, open_kind, tool_use = 0, False, -1, None, False

        def close():
            return an.event("content_block_stop", index=index)

        async for ev in _guard(timed(handle), an_error):
            if not started:
                for line in an.stream_start(rid, model, ev.prompt_tokens, ev.cached_tokens):
                    yield line
                started = True
            if ev.finish_reason == "error":
                failed = ApiError(503, getattr(ev, "error", None) or "generation failed")
                yield ev.line if isinstance(ev, _Failed) else an_error(failed)
                return
            count += ev.token is not None
            parts = parser.feed(ev.text) + (parser.finish() if ev.finish_reason else [])
            for kind, value in parts:
                if kind != open_kind or kind == "tool_call":
                    if open_kind is not None:
                        yield close()
                    index += 1
                    open_kind = kind
                    if kind == "tool_call":
                        block = an.tool_block(value)
                        tool_use = True
                        start = dict(block, input={})
                        yield an.event("content_block_start", index=index, content_block=start)
                        delta = {"type": "input_json_delta", "partial_json": value["arguments"]}
                        yield an.event("content_block_delta", index=index, delta=delta)
                        continue
                    empty = ({"type": "thinking", "thinking": "", "signature": ""}
                             if kind == "reasoning" else {"type": "text", "text": ""})  # fmt: skip
                    yield an.event("content_block_start", index=index, content_block=empty)
                delta = ({"type": "thinking_delta", "thinking": value} if kind == "reasoning"
                         else {"type": "text_delta", "text": value})  # fmt: skip
                yield an.event("content_block_delta", index=index, delta=delta)
            if ev.finish_reason is not None:
                if open_kind is None:  # an empty answer still has one text block
                    index = 0
                    yield an.event("content_block_start", index=0,
                                   content_block={"type": "text", "text": ""})  # fmt: skip
                yield close()
                delta = {"stop_reason": an.stop_reason(ev, handle.stop_matched, tool_use),
                         "stop_sequence": handle.stop_matched}  # fmt: skip
                yield an.event("message_delta", delta=delta, usage={"output_tokens": count})
                yield an.event("message_stop")

    async def list_models(request: HttpRequest):
        try:
            check_key(request)
        except ApiError as e:
            return _error(e)
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "mlxllm",
                 "loaded": True} for m in models.loaded.values()]  # fmt: skip
        data += [{"id": r, "object": "model", "created": 0, "owned_by": "local", "loaded": False}
                 for r in models.local() if r not in models.loaded]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def health(request: HttpRequest):
        return JSONResponse({"status": "ok", "loaded": list(models.loaded)})

    routes = [
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
    ]

    async def expire():
        while True:  # models idle past keep_alive go
            await asyncio.sleep(min(5.0, max(models.keep_alive / 4, 0.05)))
            models.expire()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        models.start()
        task = asyncio.create_task(expire())
        try:
            yield
        finally:
            task.cancel()
            models.stop()  # Ctrl-C: running requests end, the engine threads exit

    return Starlette(routes=routes, lifespan=lifespan)


class _Failed:
    """A stream's last item when it fails midway: the error line to send."""

    def __init__(self, line: str):
        self.line = line
        self.finish_reason, self.text, self.token = "error", "", None


async def _guard(events, error_line):
    """``events``, and on a timeout one ``_Failed`` carrying the API's error line."""
    try:
        async for ev in events:
            yield ev
    except TimeoutError as e:
        yield _Failed(error_line(ApiError(504, str(e), kind="timeout_error")))


def oa_error(e: ApiError) -> str:
    return f"data: {json.dumps(e.body())}\n\n"


def an_error(e: ApiError) -> str:
    return an.event("error", error=an.error_body(e)["error"])


def _call(call: dict, i: int) -> dict:
    return {"id": f"call_{i}_{oa.new_id('t')[-8:]}", "type": "function", "function": call}


def _answer(ev) -> bool:
    """A generated token that is part of the answer (an eos / stop id is not)."""
    return ev.token is not None and ev.finish_reason != "stop"


def _count(events) -> int:
    return sum(1 for e in events if e.token is not None)


def _reason(ev) -> str:
    return "length" if ev.finish_reason == "length" else "stop"
