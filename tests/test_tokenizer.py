"""Tests for mlxllm.tokenizer; transformers' AutoTokenizer is the oracle (imported here only)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from mlxllm.tokenizer import ChatTemplateError, StreamingDetokenizer, Tokenizer, load_tokenizer

QWEN = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"
MODELS = [QWEN, SMOL]

TEXTS = [
    "Hello, world! How are you doing today?",
    "def reverse(s: str) -> str:\n    return s[::-1]\n\n\nprint(reverse('abc'))\t# done",
    "你好，世界！今天天气很好。",
    "🚀🎉 emoji 👨‍👩‍👧 and naïve café — “quotes”",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing  ",
    "",
]

STREAM_TEXT = "你好，世界！今天天气很好。🚀🎉 naïve café"


def fixture_model(name: str) -> Path:
    """Folder of a real fixture checkpoint; fails (never skips) when it has not been built."""
    root = Path(os.environ.get("MLXLLM_FIXTURES", "~/.cache/mlxllm-fixtures/models")).expanduser()
    folder = root / name
    if not (folder / "tokenizer.json").is_file():
        pytest.fail(
            f"fixture model {folder} is missing; build it with: bash ../shared/fixtures/"
            "make_real_models.sh ~/.cache/mlxllm-fixtures/venv ~/.cache/mlxllm-fixtures/models"
        )
    return folder


@functools.cache
def _ours(name: str) -> Tokenizer:
    return load_tokenizer(fixture_model(name))


@functools.cache
def _hf(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixture_model(name)))


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.finalize())
    assert detok.tokens == list(ids)
    assert detok.text == "".join(chunks)
    return chunks


# ---------------------------------------------------------------------------------------------
# 1. encode / decode parity with transformers


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(name, add_special):
    ours, hf = _ours(name), _hf(name)
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=add_special)
        assert ours.encode(text, add_special_tokens=add_special) == expected, text


@pytest.mark.parametrize("name", MODELS)
def test_special_tokens_in_text_are_single_ids(name):
    ours = _ours(name)
    for token in ("<|im_start|>", "<|im_end|>"):
        tid = ours.token_to_id(token)
        assert tid is not None
        assert ours.encode(f"a{token}b", add_special_tokens=False).count(tid) == 1


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trip_and_parity(name):
    ours, hf = _ours(name), _hf(name)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        )


@pytest.mark.parametrize("name", MODELS)
def test_special_token_attributes(name):
    ours, hf = _ours(name), _hf(name)
    assert ours.eos_token == hf.eos_token
    assert ours.bos_token == hf.bos_token
    assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(hf)
    assert ours.backend == "tokenizers"


# ---------------------------------------------------------------------------------------------
# 2. chat templates

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 你好 in English? 🚀"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city (°C).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        CONVERSATION,
    ],
    ids=["single-user", "multi-turn"],
)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(name, messages, gen_prompt):
    ours, hf = _ours(name), _hf(name)
    assert ours.chat_template
    expected = hf.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt) == expected


def test_chat_template_with_tools_matches_transformers():
    ours, hf = _ours(QWEN), _hf(QWEN)
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    expected = hf.apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False
    )
    got = ours.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert got == expected
    assert '"name": "get_weather"' in got and "Zürich" in got


def test_chat_template_file_wins_over_config(tmp_path):
    folder = _tiny_tokenizer_folder(tmp_path, chat_template="FROM CONFIG")
    (folder / "chat_template.jinja").write_text("FROM FILE {{ messages | length }}")
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}]) == (
        "FROM FILE 1"
    )


def test_chat_template_list_form_takes_default(tmp_path):
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ bos_token }}{{ enable_thinking }}"},
    ]
    folder = _tiny_tokenizer_folder(tmp_path, chat_template=templates, bos_token="<s>")
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template([], enable_thinking=False) == "DEFAULT <s>False"


# ---------------------------------------------------------------------------------------------
# 3. the sandbox and template helpers


def _tiny_tokenizer_folder(tmp_path: Path, chat_template=None, **config) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    folder = tmp_path / "tiny"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<|end|>", **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set xs = [] %}{{ xs.append(1) }}{{ xs }}",
        "{% set d = {} %}{{ d.update({'a': 1}) }}",
        "{{ messages.pop() }}",
    ],
)
def test_sandbox_blocks_unsafe_templates(tmp_path, template):
    tok = load_tokenizer(_tiny_tokenizer_folder(tmp_path, chat_template=template))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="unsafe") as info:
        tok.apply_chat_template(messages)
    assert "\n" not in str(info.value) and "--no-chat-template" in str(info.value)
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_helpers(tmp_path):
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|"
        "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=true) }}|"
        "{{ {'a': 1} | tojson(separators=(',', ':')) }}|{{ strftime_now('%Y') | length }}|"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
        "{% if add_generation_prompt %}GEN{% endif %}|{{ tools | tojson }}"
    )
    tok = load_tokenizer(_tiny_tokenizer_folder(tmp_path, chat_template=template, bos_token="<s>"))
    out = tok.apply_chat_template([{"role": "user", "content": "héllo <b> & 你"}])
    assert out == (
        '<s>|<|end|>|False|{"role": "user", "content": "héllo <b> & 你"}|'
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}|{"a":1}|4|01|GEN|null'
    )
    out = tok.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=False, tools=[{"x": 1}]
    )
    assert out.endswith('||[{"x": 1}]')


def test_raise_exception_and_missing_template(tmp_path):
    tok = load_tokenizer(
        _tiny_tokenizer_folder(
            tmp_path, chat_template="{{ raise_exception('Roles must alternate user/assistant') }}"
        )
    )
    with pytest.raises(ValueError, match="Roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = None
    with pytest.raises(ValueError, match="--no-chat-template") as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 4. streaming detokenizer


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("text", [STREAM_TEXT, "🚀🎉👨‍👩‍👧" * 5, TEXTS[1], TEXTS[4] + "你好"])
def test_streaming_matches_decode(name, text):
    tok = _ours(name)
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids)
    assert "".join(chunks[:-1]) == tok.decode(ids)  # everything final before finalize()


@pytest.mark.parametrize("name", MODELS)
def test_streaming_skip_special_tokens(name):
    tok = _ours(name)
    ids = tok.encode(TEXTS[4] + STREAM_TEXT + "<|im_end|>")
    detok = tok.detokenizer(skip_special_tokens=True)
    out = "".join(detok.add(i) for i in ids) + detok.finalize()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in out


def test_streaming_invalid_bytes_do_not_stall():
    tok = _ours(QWEN)
    bad = tok.token_to_id("ÿ")  # byte-level token for the lone byte 0xFF, never valid UTF-8
    assert bad is not None
    ids = [bad] * 30 + tok.encode(" ok 你好")
    detok = tok.detokenizer()
    chunks = [detok.add(i) for i in ids]
    assert "".join(chunks).count("\ufffd") >= 20  # emitted before finalize, not held forever
    chunks.append(detok.finalize())
    assert "".join(chunks) == tok.decode(ids)


def test_streaming_window_stays_small():
    tok = _ours(QWEN)
    sizes: list[int] = []

    def decode(ids):
        sizes.append(len(ids))
        return tok.decode(ids)

    ids = tok.encode((STREAM_TEXT + " The lighthouse keeper wrote it down.\n") * 60)
    assert len(ids) > 1000
    detok = StreamingDetokenizer(decode)
    out = "".join(detok.add(i) for i in ids)
    assert max(sizes) <= 16
    assert out + detok.finalize() == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# 5. sentencepiece backend

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A local runtime for language models runs on the machine in front of you.",
    "Tokenizers split text into pieces; pieces map to integer ids.",
    "Hello world, hello there, hello again and goodbye.",
    "def main(): return 42",
]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SP_CORPUS * 20) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,  # byte_fallback alone takes 256 pieces
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    n_pieces = spm.SentencePieceProcessor(
        model_file=str(folder / "tokenizer.model")
    ).get_piece_size()
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "unk_token": "<unk>",
        "added_tokens_decoder": {
            str(n_pieces): {"content": "<|im_start|>", "special": True},
            str(n_pieces + 1): {"content": "<|im_end|>", "special": True},
        },
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, n_pieces + 1]}))
    return folder


SP_TEXTS = [
    "Hello world, the quick brown fox.",
    "你好，世界！今天天气很好。🚀🎉 naïve café",
    "  two leading spaces, tabs\tand\nnewlines  ",
]


def test_sentencepiece_encode_decode(sp_folder):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    tok = load_tokenizer(sp_folder)
    assert tok.backend == "sentencepiece"
    assert tok.bos_token_id == 1 and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.eos_token_ids == {2, sp.get_piece_size() + 1}
    assert tok.vocab_size == sp.get_piece_size() + 2
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert ids[1:] == sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text
    # the non-ASCII text really goes through byte-fallback pieces
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(SP_TEXTS[1]))


def test_sentencepiece_added_tokens(sp_folder):
    tok = load_tokenizer(sp_folder)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert start is not None and end == start + 1
    text = "<|im_start|>Hello world<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == start and ids[-1] == end and ids.count(start) == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>hi<|im_end|>"
    )


@pytest.mark.parametrize("text", SP_TEXTS + ["<|im_start|>你好 world<|im_end|> 🚀"])
def test_sentencepiece_streaming(sp_folder, text):
    tok = load_tokenizer(sp_folder)
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# BOS handling of tokenizer.json backends (Llama-style post-processor)


def _llama_style_folder(tmp_path: Path, config: dict) -> Path:
    from tokenizers import processors

    folder = _tiny_tokenizer_folder(tmp_path, bos_token="<s>", **config)
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize(
    "config", [{}, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}]
)
def test_bos_post_processor_matches_transformers(tmp_path, config):
    from transformers import AutoTokenizer

    folder = _llama_style_folder(tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", **config})
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in ("hello world", "the fox<|end|>"):
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(
                text, add_special_tokens=add
            ), (text, add)
    if not config:
        assert ours.encode("hello")[0] == ours.bos_token_id


# ---------------------------------------------------------------------------------------------
# 6. eos ids


def test_qwen_eos_ids_include_generation_config():
    folder = fixture_model(QWEN)
    gen = json.loads((folder / "generation_config.json").read_text())
    listed = gen["eos_token_id"]
    listed = listed if isinstance(listed, list) else [listed]
    tok = _ours(QWEN)
    assert set(listed) <= tok.eos_token_ids
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids


def test_eos_ids_from_all_sources(tmp_path):
    folder = _tiny_tokenizer_folder(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [8, 9]}))
    tok = load_tokenizer(folder)
    assert tok.eos_token_ids == {tok.token_to_id("<|end|>"), 7, 8, 9}


# ---------------------------------------------------------------------------------------------
# 7. missing files


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
