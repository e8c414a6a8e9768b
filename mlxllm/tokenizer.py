"""Tokenizer, chat template rendering and streaming detokenization.

Two backends are supported:

* ``tokenizer.json`` (Hugging Face ``tokenizers``), used whenever the file is present;
* ``tokenizer.model`` (``sentencepiece``), used when there is no ``tokenizer.json``.

Chat templates are Jinja templates as used by Hugging Face checkpoints; they are rendered in an
immutable sandbox. This module deliberately avoids importing mlx or transformers so that it can be
used (and tested) on any machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxllm.errors import MlxllmError, read_json_object

__all__ = [
    "ChatTemplateError",
    "StreamingDetokenizer",
    "Tokenizer",
    "load_tokenizer",
]

_REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so holding back more than a few tokens while the text
# ends in U+FFFD is pointless: past this many pending tokens the detokenizer looks for the
# longest prefix that is final and emits it.
_MAX_PENDING = 8


class ChatTemplateError(MlxllmError, ValueError, TemplateError):
    """A chat template that cannot render: ``raise_exception(...)`` inside it, a syntax error,
    an unsafe or unbounded operation, a timeout, or no template at all."""

    def __init__(self, message: str) -> None:
        TemplateError.__init__(self, message)
        ValueError.__init__(self, message)

    def __str__(self) -> str:
        return self.message or ""


# --------------------------------------------------------------------------------------------
# small helpers


def _read_json(path: Path) -> dict:
    """An optional JSON object file ({} when absent); a malformed one is one clear error."""
    return read_json_object(path, "tokenizer file") if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_int_list(value: Any) -> list[int]:
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
    return None


# --------------------------------------------------------------------------------------------
# backends


class _HFBackend:
    """``tokenizers`` backend (tokenizer.json)."""

    name = "tokenizers"

    def __init__(self, path: Path) -> None:
        import tokenizers

        # tokenizer.json's own post-processor decides what add_special_tokens adds (BOS for
        # Llama-style checkpoints, nothing for Qwen2); transformers 5 does the same and ignores
        # add_bos_token / add_eos_token in tokenizer_config.json for tokenizer.json checkpoints.
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise MlxllmError(
                f"{path} is not a valid tokenizer file ({e}); re-download it"
            ) from None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SPBackend:
    """``sentencepiece`` backend (tokenizer.model) with added/special tokens split out."""

    name = "sentencepiece"

    def __init__(
        self,
        path: Path,
        config: dict,
        named_tokens: Iterable[str | None],
    ) -> None:
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise MlxllmError(
                f"{path} is not a valid sentencepiece model ({e}); re-download it"
            ) from None
        self.n_pieces = self.sp.get_piece_size()
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))

        # content -> id for every token that must be matched verbatim in text
        self.added: dict[str, int] = {}
        self.special_ids: set[int] = set()
        decoder = config.get("added_tokens_decoder") or {}
        for key, info in decoder.items():
            content = _token_str(info)
            if content is None:
                continue
            try:
                tid = int(key)
            except ValueError:
                continue
            self.added[content] = tid
            if not isinstance(info, dict) or info.get("special", True):
                self.special_ids.add(tid)
        unk_id = self.sp.unk_id()
        for content in named_tokens:
            if not content or content in self.added:
                continue
            tid = self.sp.piece_to_id(content)
            if tid == unk_id and self.sp.id_to_piece(unk_id) != content:
                continue
            self.added[content] = tid
            self.special_ids.add(tid)
        self.added_by_id = {tid: content for content, tid in self.added.items()}
        self.split_re = None
        if self.added:
            alternatives = sorted(self.added, key=len, reverse=True)
            self.split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

        bos_id = self.sp.bos_id()
        eos_id = self.sp.eos_id()
        self.bos_id: int | None = bos_id if bos_id >= 0 else None
        self.eos_id: int | None = eos_id if eos_id >= 0 else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        pieces = self.split_re.split(text) if self.split_re is not None else [text]
        for i, part in enumerate(pieces):
            if i % 2 == 1:  # a captured added token
                ids.append(self.added[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for tid in ids:
            tid = int(tid)
            if tid in self.added_by_id:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not (skip_special_tokens and tid in self.special_ids):
                    out.append(self.added_by_id[tid])
            elif 0 <= tid < self.n_pieces:
                run.append(tid)
            # ids beyond the vocabulary (padded embedding rows) decode to nothing
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        tid = self.sp.piece_to_id(token)
        if tid == self.sp.unk_id() and self.sp.id_to_piece(tid) != token:
            return None
        return tid

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added_by_id:
            return self.added_by_id[token_id]
        if 0 <= token_id < self.n_pieces:
            return self.sp.id_to_piece(token_id)
        return None

    @property
    def vocab_size(self) -> int:
        return max([self.n_pieces, *(tid + 1 for tid in self.added_by_id)])


# --------------------------------------------------------------------------------------------
# chat templates


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (used by some HF templates to mark assistant
    output for training masks); rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


# A chat template comes with the model, so it is untrusted code: besides the sandbox's rules it
# gets a time limit and a bound on what it may build (a template that loops for hours, or asks
# for 'a' * 2000000000, must fail in seconds with one line, not hang the CLI or fill memory).
TEMPLATE_MAX_SECONDS = 5.0
TEMPLATE_MAX_CHARS = 1 << 25  # 32M characters of output (several million tokens)
_MAX_EXPONENT = 4096


def _too_big(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and abs(n) > TEMPLATE_MAX_CHARS


def _bounded(name: str, fn: Callable) -> Callable:
    """A filter or function that refuses integer arguments beyond the output bound (widths,
    counts: ``center(2000000000)``)."""

    @functools.wraps(fn)  # keeps jinja's pass_context / pass_environment marks
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError(f"{name}() with a size beyond {TEMPLATE_MAX_CHARS} is refused")
        return fn(*args, **kwargs)

    return wrapped


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that raises at once on unsafe attribute access (instead of returning an
    undefined value that would print as an empty string) and refuses operations that would build
    values beyond ``TEMPLATE_MAX_CHARS``."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise SecurityError(
                            f"a {type(seq).__name__} of {len(seq) * n} items is beyond the "
                            f"template bound of {TEMPLATE_MAX_CHARS}"
                        )
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"an exponent of {right} is refused")
        if operator == "%" and isinstance(left, str) and re.search(r"\d{8,}", left):
            raise SecurityError("a format width beyond the template bound is refused")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError(f"a call with a size beyond {TEMPLATE_MAX_CHARS} is refused")
        # str.format arrives wrapped by the sandbox (its formatter); the string is the bound
        # method's __self__, on the wrapper's __wrapped__
        method = getattr(__obj, "__wrapped__", __obj)
        if getattr(method, "__name__", "") in ("format", "format_map"):
            text = getattr(method, "__self__", None)
            if isinstance(text, str) and re.search(r"\d{8,}", text):
                raise SecurityError("a format width beyond the template bound is refused")
        return super().call(__context, __obj, *args, **kwargs)


class _TemplateTimeout(BaseException):
    """Raised inside a rendering thread past its time limit (a BaseException, so that no
    ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise ``_TemplateTimeout`` in this thread once ``seconds`` have passed.

    A watchdog thread sets an asynchronous exception on this thread (CPython's
    ``PyThreadState_SetAsyncExc``), which pure-Python code, as compiled templates are, sees
    within a few bytecodes. Leaving the block in time cancels it; an exception set but not yet
    delivered is withdrawn under the same lock, so it never lands after the block.
    """
    import ctypes

    set_async_exc = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    if set_async_exc is None:  # not CPython: the other bounds still apply
        yield
        return
    tid = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire():
        with lock:
            if not state["done"]:
                state["fired"] = True
                set_async_exc(tid, ctypes.py_object(_TemplateTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            if state["fired"]:
                set_async_exc(tid, None)  # NULL: drop an exception not delivered yet
        timer.cancel()


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | list[str] | None = None,
    sort_keys: bool = False,
) -> str:
    if separators is not None:
        separators = tuple(separators)
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _chat_environment() -> jinja2.Environment:
    env = _ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters = {k: _bounded(k, f) for k, f in env.filters.items()}
    for k, f in list(env.globals.items()):
        if callable(f) and not isinstance(f, type):
            env.globals[k] = _bounded(k, f)
    return env


# --------------------------------------------------------------------------------------------
# streaming detokenizer


class StreamingDetokenizer:
    """Turns a stream of token ids into text, emitting only text that is final.

    Works on a small window of tokens: ``decode(tokens[start:])`` minus ``decode(tokens[start:
    ready])``, where ``ready`` is the number of tokens whose text has been emitted and ``start`` is
    the previous ``ready`` (one emission of left context, so leading-space rules of
    sentencepiece/Metaspace decoders see the same neighbour as a full decode). While the window's
    text ends in U+FFFD (an incomplete UTF-8 sequence) nothing is emitted. ``finalize()`` checks
    against a full decode, so the concatenation of all outputs equals ``decode(tokens)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self._start = 0  # window start (a safe point)
        self._ready = 0  # tokens whose text has been emitted (a safe point)

    def _emit(self, new_ready: int, window_text: str, prefix_text: str) -> str:
        if window_text.startswith(prefix_text):
            new = window_text[len(prefix_text) :]
        else:  # a decoder that rewrote earlier text; resynchronise on a full decode
            full = self._decode(self.tokens[:new_ready])
            new = full[len(self.text) :] if full.startswith(self.text) else ""
        self._start, self._ready = self._ready, new_ready
        self.text += new
        return new

    def add(self, token_id: int) -> str:
        """Add one token; return the newly finalised text (possibly empty)."""
        self.tokens.append(int(token_id))
        n = len(self.tokens)
        window = self._decode(self.tokens[self._start :])
        prefix = (
            self._decode(self.tokens[self._start : self._ready])
            if self._ready > self._start
            else ""
        )
        if not window.endswith(_REPLACEMENT):
            return self._emit(n, window, prefix)
        if n - self._ready <= _MAX_PENDING:
            return ""
        # Many tokens pending and the text still ends in U+FFFD (invalid bytes, or a literal
        # U+FFFD). Emit the longest prefix whose text can no longer change.
        for cut in range(n - 1, self._ready, -1):
            part = self._decode(self.tokens[self._start : cut])
            if len(part) > len(prefix) and window.startswith(part):
                return self._emit(cut, part, prefix)
        return ""

    def finalize(self) -> str:
        """Flush all remaining text (including a trailing U+FFFD, if any)."""
        full = self._decode(self.tokens)
        if full.startswith(self.text):
            new = full[len(self.text) :]
        else:  # cannot happen for well-behaved decoders; fall back to the window
            window = self._decode(self.tokens[self._start :])
            prefix = self._decode(self.tokens[self._start : self._ready])
            new = window[len(prefix) :] if window.startswith(prefix) else ""
        self.text += new
        self._start = self._ready = len(self.tokens)
        return new


# --------------------------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A tokenizer loaded from a Hugging Face style model folder (see :func:`load_tokenizer`)."""

    def __init__(self, path: str | Path) -> None:
        folder = Path(path).expanduser()
        self.path = folder
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")

        def named(key: str) -> str | None:
            value = _token_str(tok_cfg.get(key))
            return value if value is not None else _token_str(special_map.get(key))

        self.bos_token: str | None = named("bos_token")
        self.eos_token: str | None = named("eos_token")
        self.unk_token: str | None = named("unk_token")
        self.pad_token: str | None = named("pad_token")

        json_file = folder / "tokenizer.json"
        sp_file = folder / "tokenizer.model"
        if json_file.is_file():
            self._backend: _HFBackend | _SPBackend = _HFBackend(json_file)
        elif sp_file.is_file():
            extra = [_token_str(t) for t in tok_cfg.get("additional_special_tokens") or []]
            self._backend = _SPBackend(
                sp_file,
                tok_cfg,
                [self.bos_token, self.eos_token, self.unk_token, self.pad_token, *extra],
            )
            sp = self._backend
            if self.bos_token is None and sp.bos_id is not None:
                self.bos_token = sp.sp.id_to_piece(sp.bos_id)
            if self.eos_token is None and sp.eos_id is not None:
                self.eos_token = sp.sp.id_to_piece(sp.eos_id)
            if self.unk_token is None and sp.sp.unk_id() >= 0:
                self.unk_token = sp.sp.id_to_piece(sp.sp.unk_id())
            if self.bos_token is not None:
                sp.bos_id = sp.token_to_id(self.bos_token)
            if self.eos_token is not None:
                sp.eos_id = sp.token_to_id(self.eos_token)
        else:
            if not folder.is_dir():
                raise FileNotFoundError(f"tokenizer folder not found: {folder}")
            raise FileNotFoundError(
                f"no tokenizer in {folder}: looked for tokenizer.json and tokenizer.model"
            )

        self.bos_token_id: int | None = self._id_of(self.bos_token)
        self.pad_token_id: int | None = self._id_of(self.pad_token)
        self.unk_token_id: int | None = self._id_of(self.unk_token)
        eos_id = self._id_of(self.eos_token)
        self.eos_token_ids: set[int] = set() if eos_id is None else {eos_id}
        self.eos_token_ids.update(_as_int_list(gen_cfg.get("eos_token_id")))
        self.eos_token_ids.update(_as_int_list(model_cfg.get("eos_token_id")))
        text_cfg = model_cfg.get("text_config")
        if isinstance(text_cfg, dict):
            self.eos_token_ids.update(_as_int_list(text_cfg.get("eos_token_id")))
        self.eos_token_id: int | None = eos_id
        if self.eos_token_id is None and self.eos_token_ids:
            self.eos_token_id = min(self.eos_token_ids)

        self.chat_template: str | None = self._find_chat_template(folder, tok_cfg)
        self._compiled_template: tuple[str, jinja2.Template] | None = None

    # ---- loading helpers

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @staticmethod
    def _find_chat_template(folder: Path, tok_cfg: dict) -> str | None:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        json_template = _pick_chat_template(
            _read_json(folder / "chat_template.json").get("chat_template")
        )
        if json_template is not None:
            return json_template
        return _pick_chat_template(tok_cfg.get("chat_template"))

    # ---- properties

    @property
    def backend(self) -> str:
        """``"tokenizers"`` or ``"sentencepiece"``."""
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    # ---- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        backend = self._backend
        return StreamingDetokenizer(lambda ids: backend.decode(ids, skip_special_tokens))

    # ---- chat template

    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ChatTemplateError(
                f"the tokenizer in {self.path} has no chat template; "
                "pass --no-chat-template to use the raw prompt"
            )
        if self._compiled_template is None or self._compiled_template[0] != self.chat_template:
            try:
                compiled = _chat_environment().from_string(self.chat_template)
            except TemplateError as e:
                raise self._failed(e) from None
            self._compiled_template = (self.chat_template, compiled)
        return self._compiled_template[1]

    def _failed(self, e: BaseException) -> ChatTemplateError:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        return ChatTemplateError(
            f"the chat template of {self.path} failed{line}: {what}; fix the template or "
            "pass --no-chat-template"
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template (as transformers does with
        ``tokenize=False``). Extra keyword arguments (e.g. ``enable_thinking``) are passed to the
        template."""
        template = self._template()
        variables: dict[str, Any] = {
            "messages": messages,
            "tools": tools,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = getattr(self, key)
            if value is not None:
                variables[key] = value
        variables.update(kwargs)
        parts, size = [], 0
        try:
            with _time_limit(TEMPLATE_MAX_SECONDS):
                for part in template.generate(**variables):
                    size += len(part)
                    if size > TEMPLATE_MAX_CHARS:
                        raise SecurityError(f"output beyond {TEMPLATE_MAX_CHARS} characters")
                    parts.append(part)
        except ChatTemplateError:
            raise  # raise_exception() in the template: its own message
        except _TemplateTimeout:
            raise self._failed(
                TimeoutError(f"still rendering after {TEMPLATE_MAX_SECONDS:.0f} s")
            ) from None
        except Exception as e:  # the template's own code failed: never a traceback
            raise self._failed(e) from None
        return "".join(parts)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face style model folder.

    Uses ``tokenizer.json`` when present, otherwise ``tokenizer.model`` (sentencepiece); also
    reads tokenizer_config.json, special_tokens_map.json, generation_config.json, config.json and
    chat_template.jinja when present.
    """
    return Tokenizer(path)
