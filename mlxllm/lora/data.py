"""Fine-tuning data: a folder of JSONL files turned into token ids with a loss mask.

``DIR/train.jsonl`` and ``DIR/valid.jsonl`` (``DIR/test.jsonl`` optional). One JSON object a line,
in one of three formats:

* ``{"text": ...}``: plain text; every token is trained on.
* ``{"prompt": ..., "completion": ...}``: a user turn and an assistant turn through the chat
  template when the tokenizer has one (else plain concatenation); loss on the completion only.
* ``{"messages": [...], "tools": [...]}``: a conversation through the chat template; loss on the
  assistant turns only (``mask_prompt=False`` trains on every token).

The assistant mask comes from the template itself: for assistant message ``i`` the tokens of
``render(messages[:i], add_generation_prompt=True)`` are the prompt, those of
``render(messages[:i + 1])`` end the turn. The turn is cut after its last end-of-turn token so
that the template's separator (``"\\n"`` after ``<|im_end|>``) is not trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxllm.errors import MlxllmError

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    """Token ids and a 0/1 mask of the same length: 1 where the token is a training target."""

    ids: list[int]
    mask: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _RowError(ValueError):
    pass


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise _RowError('"messages" must be a non-empty list')
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _RowError(f'message {j} must be an object with a "role"')
        if "content" in m and not isinstance(m["content"], (str, list, type(None))):
            raise _RowError(f'message {j} has a "content" that is not a string')


def encode_messages(
    tokenizer, messages: list[dict], tools: list | None = None, mask_prompt: bool = True
) -> Example:
    """Chat-template a conversation; mask the assistant turns (content + end-of-turn token)."""
    render = tokenizer.apply_chat_template
    ids = tokenizer.encode(render(messages, add_generation_prompt=False, tools=tools), False)
    if not mask_prompt:
        return Example(ids, [1] * len(ids))
    mask = [0] * len(ids)
    ends = set(tokenizer.eos_token_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.encode(
            render(messages[:i], add_generation_prompt=True, tools=tools), False
        )
        turn = tokenizer.encode(
            render(messages[: i + 1], add_generation_prompt=False, tools=tools), False
        )
        # token prefixes, not string prefixes: a merge across the boundary moves it a little
        start = _common_prefix(prompt, ids)
        stop = _common_prefix(turn, ids)
        last_end = max((j for j in range(start, stop) if ids[j] in ends), default=None)
        if last_end is not None:
            stop = last_end + 1
        for j in range(start, stop):
            mask[j] = 1
    return Example(ids, mask)


def encode_row(tokenizer, row, mask_prompt: bool = True) -> Example:
    """One JSONL row (already parsed) -> ``Example``; raises ``_RowError`` on a bad row."""
    if not isinstance(row, dict):
        raise _RowError("a row must be a JSON object")
    has_template = tokenizer.chat_template is not None
    if "messages" in row:
        _check_messages(row["messages"])
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _RowError('"tools" must be a list')
        if not has_template:
            raise _RowError("chat rows need a tokenizer with a chat template")
        return encode_messages(tokenizer, row["messages"], tools, mask_prompt)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _RowError('"prompt" and "completion" must both be strings')
        if has_template:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return encode_messages(tokenizer, messages, None, mask_prompt)
        p = tokenizer.encode(prompt, True)
        ids = tokenizer.encode(prompt + completion, True)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        start = _common_prefix(p, ids) if mask_prompt else 0
        return Example(ids, [0] * start + [1] * (len(ids) - start))
    if "text" in row:
        if not isinstance(row["text"], str):
            raise _RowError('"text" must be a string')
        ids = tokenizer.encode(row["text"], True)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return Example(ids, [1] * len(ids))
    raise _RowError('a row needs "text", "prompt" and "completion", or "messages"')


def load_jsonl(
    path: str | os.PathLike, tokenizer, max_seq_length: int = 2048, mask_prompt: bool = True
) -> list[Example]:
    """Read and tokenize one JSONL file; a bad row raises ``MlxllmError`` naming file:line.

    Examples longer than ``max_seq_length`` tokens are truncated (from the end).
    """
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = encode_row(tokenizer, json.loads(line), mask_prompt)
            except json.JSONDecodeError as e:
                raise MlxllmError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except _RowError as e:
                raise MlxllmError(f"{path}:{n}: {e}") from None
            except Exception as e:  # a template that rejects the conversation
                raise MlxllmError(f"{path}:{n}: the chat template failed: {e}") from None
            if len(ex.ids) < 2:
                raise MlxllmError(f"{path}:{n}: the row has fewer than 2 tokens")
            out.append(Example(ex.ids[:max_seq_length], ex.mask[:max_seq_length]))
    return out


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    """The data folder, checked for its required files (before any model loads)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise MlxllmError(f"data folder {data_dir} does not exist")
    for split in SPLITS[:2]:
        if not (data_dir / f"{split}.jsonl").is_file():
            raise MlxllmError(f"{data_dir} has no {split}.jsonl (rows of JSON, one per line)")
    return data_dir


def load_dataset(
    data_dir: str | os.PathLike, tokenizer, max_seq_length: int = 2048, mask_prompt: bool = True
) -> dict[str, list[Example]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` from a data folder (test optional)."""
    data_dir = check_data_dir(data_dir)
    out = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            continue  # test.jsonl is optional; check_data_dir required the others
        out[split] = load_jsonl(path, tokenizer, max_seq_length, mask_prompt)
        if not out[split] and split != "test":
            raise MlxllmError(f"{path} has no rows")
    return out


def make_batches(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, then cut)."""
    if len(examples) < batch_size:
        raise MlxllmError(
            f"batch size {batch_size} is larger than the {len(examples)} examples; "
            "lower --batch-size"
        )
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].ids), i))
    n = len(order) // batch_size
    return [order[b * batch_size : (b + 1) * batch_size] for b in range(n)]


def batch_at(batches: list[list[int]], index: int, seed: int) -> list[int]:
    """The ``index``-th training batch: epochs visit the batches in a seeded shuffled order.

    A pure function of ``(index, seed)``, so a resumed run sees exactly the same data.
    """
    epoch, k = divmod(index, len(batches))
    perm = np.random.default_rng([seed, epoch]).permutation(len(batches))
    return batches[perm[k]]


def collate(examples: list[Example], pad_id: int = 0, pad_multiple: int = 1, max_length: int = 0):
    """Pad to the longest example. Returns numpy ``(inputs, targets, mask)``, each ``[B, L-1]``:
    position t predicts token t+1, counted where that target token is masked in.

    ``pad_multiple`` rounds ``L-1`` up (fewer distinct shapes for a compiled step), but not
    past ``max_length`` tokens; padding is masked out and, being at the end, never seen by
    earlier positions.
    """
    longest = max(len(e.ids) for e in examples)
    L = -(-(longest - 1) // pad_multiple) * pad_multiple + 1
    L = max(longest, min(L, max_length)) if max_length else L
    ids = np.full((len(examples), L), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), L), dtype=np.float32)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids
        mask[b, : len(e.mask)] = e.mask
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]
