"""Training an MTP head (``mtp.py``) on a frozen model: ``mlxllm finetune MODEL --mtp``.

For token ids ``x[B, L]`` the model's final hidden states ``h = model.model(x)`` are computed
without gradients (the model stays frozen), and the MTP layer at position ``i`` reads
``(h[:, i], embed(x[:, i + 1]))`` and predicts ``x[:, i + 2]``: cross-entropy through the model's
own head on positions ``0 .. L - 3`` (``mtp_loss``). Only the MTP layer trains: AdamW with
warmup + cosine decay, LoRA's fused chunked head cross-entropy (``lora.train``).

Targets (``targets``): ``"model"`` (the default) is self-distillation: the token to predict at
``i + 2`` is the frozen model's own greedy choice there, ``argmax head(h[i + 1])``, which is what
verification compares a draft with; ``"data"`` takes the text's token ``x[i + 2]``. A draft is
accepted when it equals the model's choice, whether or not the text agrees. On the Qwen fixture
(100 steps at 1e-4, batch 2 x 256, six held-out stdlib files) model targets drafted 24.7% of
first drafts right, data targets 23.0%.

Initialization (``init="last_block"``, the default): the MTP block's job, turning a residual
stream into the hidden state whose norm the head reads for the next token, is the job of the
model's last block, so its weights are copied into the MTP block and the model's final norm into
``shared_head.norm`` (the scale the head expects). The copy only helps if the block gets the
input it knows, the residual stream entering the last block; ``eh_proj`` is therefore set by
least squares so that ``eh_proj([enorm(e[i + 1]); hnorm(h[i])])`` best predicts that stream at
position ``i + 1`` (one ``2D x 2D`` solve over the first ``FIT_TOKENS`` training tokens, whose
residual streams the same forward pass yields). Measured on held-out stdlib code, greedy
first-draft acceptance: Qwen2.5-Coder-0.5B, 3.7K training tokens, 2 steps, 28% (the copy with a
random ``eh_proj``: 0%, a random layer: 0%; ``tests/test_mtp_train.py``); SmolLM2-135M, 300 steps
of 4 x 128 tokens, 33% at the start and 37% after (a random layer, 10x the learning rate: 33%
after). ``init="random"`` starts from ``mtp_layer``'s random layer.

The frozen hidden states of the training set are computed once and kept (``hidden_cache_gb``),
so each step costs only the MTP layer and the head; past that budget they are recomputed per
batch, example by example as the cache would hold them, so both paths train identically.

Resuming is exact (the data order is a pure function of ``(seed, step)``): every checkpoint holds
the layer, the optimizer state and the step in ONE file written atomically. A head file
``H.safetensors`` keeps its run beside it: ``H.training_state.safetensors``,
``H.training_log.json`` and ``H.loss.png``.

Data (``load_mtp_data``): a LoRA data folder (``train.jsonl`` / ``valid.jsonl``, see
``lora.data``), a folder of text files (``TEXT_SUFFIXES``, recursively; every tenth file in sorted
order, or the last one of fewer than ten, is held out for validation) or one text file (no
validation). Documents longer than ``max_seq_length`` tokens are cut into pieces of that length.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxllm.errors import MlxllmError
from mlxllm.lora.data import Example, batch_at, check_data_dir, load_jsonl, make_batches
from mlxllm.lora.layers import atomic_save_safetensors, atomic_write_text
from mlxllm.lora.train import (
    _progress,
    check_training,
    head_cross_entropy,
    head_cross_entropy_value,
    make_schedule,
    plot_losses,
)
from mlxllm.models.base import attention_mask
from mlxllm.speculative.mtp import MTPLayer, mtp_layer, save_head

HEAD_FILE = "mtp_head.safetensors"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
INITS = ("last_block", "random")
TARGETS = ("model", "data")
FIT_TOKENS = 1 << 16  # training tokens the least-squares eh_proj sees (plenty for 2D features)
FIT_RIDGE = 0.1  # x mean(diag) of the Gram matrix; 1e-4 .. 1e-1 gave the same acceptance


# ---- data


def _pieces(ex: Example, n: int) -> list[Example]:
    """``ex`` cut into pieces of ``n`` tokens; a tail too short to hold a target is dropped."""
    out = [Example(ex.ids[i : i + n], ex.mask[i : i + n]) for i in range(0, len(ex.ids), n)]
    return [e for e in out if len(e.ids) >= 3]


def _text_files(folder: Path) -> list[Path]:
    """The text files under ``folder``, sorted; hidden ones and ``__pycache__`` left out."""

    def shown(p: Path) -> bool:
        return not any(s.startswith(".") or s == "__pycache__" for s in p.relative_to(folder).parts)

    return sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                  and shown(p))  # fmt: skip


def check_mtp_data(data: str | os.PathLike) -> Path:
    """``data`` checked before any model loads: a LoRA data folder, a folder holding text
    files, or one text file."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise MlxllmError(
                f"--data {path}: give a folder (train.jsonl + valid.jsonl, or text files) or a "
                f"text file ({', '.join(TEXT_SUFFIXES)})"
            )
        return path
    if not path.is_dir():
        raise MlxllmError(f"data folder {path} does not exist")
    if (path / "train.jsonl").is_file():
        return check_data_dir(path)
    if not _text_files(path):
        raise MlxllmError(
            f"{path} holds neither train.jsonl nor any text file ({', '.join(TEXT_SUFFIXES)})"
        )
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlxllmError(
            f"{path} is not UTF-8 text (byte {e.start}); convert it or remove it from the data"
        ) from None


def _encode_text(tokenizer, text: str) -> Example:
    ids = tokenizer.encode(text, True)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Example(ids, [1] * len(ids))


def load_mtp_data(
    data: str | os.PathLike, tokenizer, max_seq_length: int = 2048, mask_prompt: bool = True
) -> dict[str, list[Example]]:
    """``{"train": [...], "valid": [...]}`` (``valid`` possibly empty) from ``data`` (see the
    module doc); every piece holds at least 3 tokens (one MTP target)."""
    path = check_mtp_data(data)
    if path.is_dir() and (path / "train.jsonl").is_file():
        splits = {}
        for split in ("train", "valid"):
            rows = load_jsonl(path / f"{split}.jsonl", tokenizer, 1 << 62, mask_prompt)
            splits[split] = [p for e in rows for p in _pieces(e, max_seq_length)]
    else:
        files = [path] if path.is_file() else _text_files(path)
        held = set(files[9::10] or files[1:][-1:])  # every tenth; of 2..9 files the last
        splits = {"train": [], "valid": []}
        for f in files:
            pieces = _pieces(_encode_text(tokenizer, _read_text(f)), max_seq_length)
            splits["valid" if f in held else "train"] += pieces
    if not splits["train"]:
        raise MlxllmError(f"{path} holds no training text of 3 tokens or more")
    return splits


# ---- the loss


def frozen_states(model, ids: mx.array) -> tuple[mx.array, mx.array]:
    """``(z, h)`` for ``ids[B, L]``: ``h = model.model(ids)`` (the final normed hidden states)
    and ``z``, the residual stream entering the last block, both ``[B, L, D]``."""
    bb = model.model
    mask = attention_mask(ids.shape[1], 0)
    z = bb.embed_tokens(ids)
    for layer in bb.layers[:-1]:
        z = layer(z, mask, None)
    return z, bb.norm(bb.layers[-1](z, mask, None))


def model_targets(model, ids: mx.array, h: mx.array, chunk: int = 256) -> mx.array:
    """``[L]`` int32: the frozen model's greedy prediction of each token of ``ids[L]`` from its
    final hidden states ``h[L, D]`` (position 0 keeps its own id: nothing predicts it)."""
    L = h.shape[0]
    preds = [mx.argmax(model.head(h[i : min(i + chunk, L - 1)]), axis=-1)
             for i in range(0, L - 1, chunk)]  # fmt: skip
    return mx.concatenate([ids[:1], *(p.astype(mx.int32) for p in preds)])


def mtp_loss(model, layer: MTPLayer, hidden, ids, mask, labels=None, grad: bool = True):
    """Mean cross-entropy of the MTP layer's predictions; returns ``(loss, n_targets)``.

    Args:
        model: the frozen model (its embedding and head are used, never trained).
        layer: the MTP layer.
        hidden: ``[B, L, D]`` the model's final hidden states of ``ids`` (no gradient).
        ids: ``[B, L]`` token ids, padded at the end.
        mask: ``[B, L]`` 1 where the token is a training target (0 on padding).
        labels: ``[B, L]`` the token to predict at each position (default ``ids``; the
            model's own predictions for self-distillation, ``model_targets``).
        grad: False for evaluation (no fused gradient).
    """
    dtype = layer.eh_proj.weight.dtype
    e = model.model.embed_tokens(ids[:, 1:-1]).astype(dtype)
    # position i: h[i] with token i + 1 predicts token i + 2; the layer masks causally itself
    out = layer(hidden[:, :-2].astype(dtype), e)  # [B, L - 2, D]
    h = layer.shared_head.norm(out)
    targets, m = (ids if labels is None else labels)[:, 2:], mask[:, 2:]
    D = h.shape[-1]
    args = (model.head, h.reshape(-1, D), targets.reshape(-1), m.reshape(-1).astype(dtype))
    ce = head_cross_entropy(*args) if grad else head_cross_entropy_value(*args)
    n = m.sum()
    return ce / mx.maximum(n, 1), n


# ---- initialization


def _float_weights(block: nn.Module, dtype) -> dict[str, mx.array]:
    """``block``'s parameters by name, quantized layers dequantized (a QLoRA-style model's
    last block holds packed weights that a fresh float block cannot load)."""
    out = dict(tree_flatten(block.parameters()))
    for path, m in block.named_modules():
        if "scales" not in m:
            continue
        p = f"{path}." if path else ""
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode)
        for k in ("weight", "scales", "biases"):
            out.pop(p + k, None)
        out[p + "weight"] = w
    return {k: v.astype(dtype) for k, v in out.items()}


def copy_last_block(model, layer: MTPLayer) -> None:
    """The model's last block into the MTP block, its final norm into ``shared_head.norm``."""
    dtype = layer.eh_proj.weight.dtype
    src = _float_weights(model.layers[-1], dtype)
    mine = dict(tree_flatten(layer.parameters()))
    wrong = [k for k, v in src.items() if k not in mine or mine[k].shape != v.shape]
    if wrong:
        raise MlxllmError(
            f"the model's last block does not fit its MTP block ({wrong[0]}); use init='random'"
        )
    src["shared_head.norm.weight"] = model.model.norm.weight.astype(dtype)
    layer.load_weights(list(src.items()), strict=False)


class _Fit:
    """Sums for the least-squares ``eh_proj``: ``G = sum f f^T``, ``C = sum f z^T`` over
    positions ``i`` with ``f = [enorm(e[i + 1]); hnorm(h[i])]`` and ``z`` the last block's input
    at ``i + 1``."""

    def __init__(self, dim: int):
        self.gram = mx.zeros((2 * dim, 2 * dim), dtype=mx.float32)
        self.cross = mx.zeros((2 * dim, dim), dtype=mx.float32)
        self.tokens = 0

    def add(self, model, layer: MTPLayer, ids: mx.array, z: mx.array, h: mx.array) -> None:
        """One example: ``ids[1, n]``, its last-block input ``z`` and hidden states ``h``."""
        e = model.model.embed_tokens(ids[0, 1:]).astype(mx.float32)
        f = mx.concatenate([layer.enorm(e), layer.hnorm(h[0, :-1].astype(mx.float32))], -1)
        t = z[0, 1:].astype(mx.float32)  # [n - 1, D]
        self.gram = self.gram + f.T @ f
        self.cross = self.cross + f.T @ t
        self.tokens += t.shape[0]

    def solve(self, layer: MTPLayer) -> None:
        n = self.gram.shape[0]
        g = self.gram + FIT_RIDGE * (mx.trace(self.gram) / n) * mx.eye(n)
        w = mx.linalg.solve(g, self.cross, stream=mx.cpu)  # [2D, D]; MLX solves on the CPU
        layer.eh_proj.weight = w.T.astype(layer.eh_proj.weight.dtype)


# ---- checks and files


def state_paths(mtp_head_path: str | os.PathLike) -> dict[str, Path]:
    """The head file and the files of its run beside it."""
    head = Path(mtp_head_path).expanduser()
    stem = head.with_suffix("") if head.suffix == ".safetensors" else head
    return {
        "head": head,
        "state": stem.with_name(f"{stem.name}.training_state.safetensors"),
        "log": stem.with_name(f"{stem.name}.training_log.json"),
        "plot": stem.with_name(f"{stem.name}.loss.png"),
    }


def check_head_path(mtp_head_path: str | os.PathLike, resume: bool, force: bool) -> dict:
    """Where a run writes, checked before anything loads: ``resume`` needs the checkpoint; a
    trained head is replaced only with ``force``."""
    paths = state_paths(mtp_head_path)
    head = paths["head"]
    if head.suffix != ".safetensors":
        raise MlxllmError(f"--mtp-head-path {head}: name a .safetensors file")
    if head.is_dir():
        raise MlxllmError(f"--mtp-head-path {head} is a folder; name a .safetensors file")
    if resume and force:
        raise MlxllmError("--resume continues the head that --force would replace; pick one")
    if resume:
        if not paths["state"].is_file():
            raise MlxllmError(f"nothing to resume: {paths['state']} does not exist")
    elif not force and (head.exists() or paths["state"].exists()):
        raise MlxllmError(
            f"{head} already exists; pass --resume to continue its training or --force to "
            "replace it (or choose another --mtp-head-path)"
        )
    if head.parent.exists() and not head.parent.is_dir():
        raise MlxllmError(f"--mtp-head-path {head}: {head.parent} is a file, not a folder")
    return paths


def check_mtp_training(
    max_seq_length: int = 2048, init: str = "last_block", targets: str = "model", **settings
) -> None:
    """``check_training``'s checks plus the MTP ones, before any model loads."""
    check_training(max_seq_length=max_seq_length, **settings)
    if max_seq_length < 3:
        raise MlxllmError(
            f"--max-seq-length {max_seq_length}: an MTP target needs at least 3 tokens"
        )
    if init not in INITS:
        raise MlxllmError(f"init {init!r}: use one of {', '.join(INITS)}")
    if targets not in TARGETS:
        raise MlxllmError(f"--mtp-targets {targets!r}: use one of {', '.join(TARGETS)}")


def model_metadata(model) -> dict:
    """What a head file records of its base model's shape (``load_head`` compares them)."""
    c = model.config
    return {
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
    }


def _save_checkpoint(paths, layer, optimizer, step: int, log: dict, meta: dict) -> None:
    paths["head"].parent.mkdir(parents=True, exist_ok=True)  # at the first checkpoint
    arrays = {f"layer.{k}": v for k, v in tree_flatten(layer.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    atomic_save_safetensors(paths["state"], arrays, {"step": str(step), "meta": json.dumps(meta)})
    head_meta = {"model": meta["name"], **meta["model"], "step": step, "init": meta["init"]}
    save_head(layer, paths["head"], head_meta)
    atomic_write_text(paths["log"], json.dumps(log))


def _load_checkpoint(paths, layer, optimizer, meta: dict) -> tuple[int, dict]:
    arrays, metadata = mx.load(str(paths["state"]), return_metadata=True)
    saved = json.loads(metadata.get("meta", "{}"))
    diff = {k for k in meta if k != "name" and saved.get(k) != meta[k]}
    if diff:
        raise MlxllmError(
            f"cannot resume from {paths['state']}: settings changed ({', '.join(sorted(diff))}); "
            "use the same settings or another --mtp-head-path"
        )
    weights = [(k[len("layer.") :], v) for k, v in arrays.items() if k.startswith("layer.")]
    layer.load_weights(weights, strict=True)
    opt = [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    optimizer.state = tree_unflatten(opt)
    log = {"train": [], "valid": []}
    if paths["log"].is_file():
        log = json.loads(paths["log"].read_text())
    step = int(metadata["step"])
    # drop log entries written after the checkpoint (a crash between the two)
    return step, {k: [e for e in v if e[0] <= step] for k, v in log.items()}


# ---- the loop


class _Hidden:
    """The frozen hidden states of a list of examples (and, for ``targets="model"``, the
    model's own predictions), computed one example at a time (so that cached and recomputed
    values are the same numbers) and kept when ``cache``."""

    def __init__(self, model, examples: list[Example], cache: bool, targets: str = "model"):
        self.model, self.examples, self.cache = model, examples, cache
        self.distill = targets == "model"
        self.kept: dict[int, tuple[mx.array, mx.array | None]] = {}

    def states(self, i: int) -> tuple[mx.array, mx.array]:
        ids = mx.array(self.examples[i].ids)
        z, h = frozen_states(self.model, ids[None])
        labels = model_targets(self.model, ids, h[0]) if self.distill else None
        mx.eval(z, h, labels)  # one example's activations at a time
        if self.cache:
            self.kept[i] = (h[0], labels)
        return z, h, labels

    def __call__(self, i: int) -> tuple[mx.array, mx.array | None]:
        if i in self.kept:
            return self.kept[i]
        _, h, labels = self.states(i)
        return h[0], labels

    def batch(self, idx: list[int]):
        """``(hidden[B, L, D], ids[B, L], mask[B, L], labels[B, L] or None)`` padded at the
        end."""
        L = max(len(self.examples[i].ids) for i in idx)
        ids = np.zeros((len(idx), L), dtype=np.int32)
        mask = np.zeros((len(idx), L), dtype=np.float32)
        rows, labels = [], []
        for b, i in enumerate(idx):
            e = self.examples[i]
            ids[b, : len(e.ids)], mask[b, : len(e.mask)] = e.ids, e.mask
            h, lab = self(i)
            rows.append(mx.pad(h, [(0, L - h.shape[0]), (0, 0)]))
            if lab is not None:
                labels.append(mx.pad(lab, [(0, L - lab.shape[0])]))
        return mx.stack(rows), mx.array(ids), mx.array(mask), mx.stack(labels) if labels else None


def _evaluate(model, layer, hidden: _Hidden, batch_size: int, max_batches: int | None) -> float:
    """Token-weighted validation loss over length-sorted batches (no shuffle)."""
    batches = make_batches(hidden.examples, min(batch_size, len(hidden.examples)))
    total, count = 0.0, 0.0
    for idx in batches[:max_batches] if max_batches else batches:
        loss, n = mtp_loss(model, layer, *hidden.batch(idx), grad=False)
        mx.eval(loss, n)  # one batch at a time bounds memory
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1)


def _prepare(model, layer, hidden: _Hidden, fit: _Fit | None, console, progress: bool) -> None:
    """One pass over the training set: fills the hidden-state cache and/or the fit's sums."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(len(e.ids) for e in hidden.examples)
    if not hidden.cache:  # only the fit needs a pass: its first FIT_TOKENS tokens
        total = min(total, FIT_TOKENS)
    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
            "{task.total} tokens"), TimeRemainingColumn())  # fmt: skip
    with Progress(*cols, console=console, disable=not progress) as bar:
        task = bar.add_task("hidden states", total=total)
        done = 0
        for i, e in enumerate(hidden.examples):
            if done >= total:
                break
            z, h, _ = hidden.states(i)
            if fit is not None and fit.tokens < FIT_TOKENS:
                fit.add(model, layer, mx.array(e.ids)[None], z, h)
                mx.eval(fit.gram, fit.cross)  # the sums, not a graph over every example
            done += len(e.ids)
            bar.update(task, completed=min(done, total))


def train(
    model: nn.Module,
    tokenizer,
    data: str | os.PathLike,
    mtp_head_path: str | os.PathLike = HEAD_FILE,
    iters: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 1e-5,
    save_every: int = 100,
    eval_every: int = 200,
    seed: int = 0,
    resume: bool = False,
    grad_accum: int = 1,
    warmup: int = 0,
    weight_decay: float = 0.01,
    max_seq_length: int = 2048,
    mask_prompt: bool = True,
    init: str = "last_block",
    targets: str = "model",
    hidden_cache_gb: float = 4.0,
    val_batches: int | None = 25,
    steps_per_report: int = 10,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    force: bool = False,
    model_name: str | None = None,
) -> dict:
    """Train an MTP head for the frozen ``model`` and write it to ``mtp_head_path``.

    Args:
        model: the model (never changed).
        tokenizer: its tokenizer.
        data: a LoRA data folder, a folder of text files or a text file (``load_mtp_data``).
        mtp_head_path: the head file (``.safetensors``); the run's checkpoint, log and plot go
            beside it (``state_paths``).
        iters: optimizer steps.
        batch_size: pieces per micro-batch.
        learning_rate: peak learning rate.
        save_every: steps between checkpoints (a checkpoint is also written at the end).
        eval_every: steps between validation losses (also at step 0 and at the end; skipped
            when the data has no validation part).
        seed: seeds the data order and the random initialization.
        resume: continue from the checkpoint beside ``mtp_head_path``.
        grad_accum: micro-batches whose gradients are averaged per optimizer step.
        warmup: linear warmup steps before the cosine decay.
        weight_decay: AdamW weight decay.
        max_seq_length: documents are cut into pieces of this many tokens.
        mask_prompt: chat and prompt/completion rows: targets on the assistant tokens only.
        init: ``"last_block"`` (see the module doc) or ``"random"``.
        targets: ``"model"`` (self-distillation, see the module doc) or ``"data"``.
        hidden_cache_gb: keep the training set's frozen hidden states when they take at most
            this much memory (else recompute them per batch).
        val_batches: cap on validation batches (None: all).
        steps_per_report: steps between progress updates of the loss.
        progress: show progress bars and messages.
        callback: ``callback(step, info)`` after every step (``info``: loss, lr).
        force: replace a head already at ``mtp_head_path`` (else refused, unless ``resume``).
        model_name: the base model's name for the head's metadata (default: its model_type).

    Returns:
        The log: ``{"train": [[step, loss], ...], "valid": [[step, loss], ...]}``.
    """
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    settings = dict(iters=iters, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    settings.update(grad_accum=grad_accum, max_seq_length=max_seq_length, warmup=warmup)
    check_mtp_training(**settings, save_every=save_every, eval_every=eval_every,
                       weight_decay=weight_decay, init=init, targets=targets)  # fmt: skip
    paths = check_head_path(mtp_head_path, resume, force)
    splits = load_mtp_data(data, tokenizer, max_seq_length, mask_prompt)
    train_set, valid_set = splits["train"], splits["valid"]
    batches = make_batches(train_set, batch_size)

    mx.random.seed(seed)  # the random parts of a fresh layer
    layer = mtp_layer(model)
    layer.set_dtype(mx.float32)  # Adam's small updates are lost on half-precision weights
    D = model.config.hidden_size
    n_tokens = sum(len(e.ids) for e in train_set)
    cache_bytes = n_tokens * D * model.model.norm.weight.dtype.size
    cached = cache_bytes <= hidden_cache_gb * 1e9
    n_params = sum(v.size for _, v in tree_flatten(layer.parameters()))
    console.print(
        f"MTP layer: {n_params / 1e6:.2f}M parameters; {len(train_set)} train / "
        f"{len(valid_set)} valid pieces ({n_tokens} train tokens); hidden states "
        + (f"kept ({cache_bytes / 1e9:.2f} GB)" if cached else
           f"recomputed per batch ({cache_bytes / 1e9:.2f} GB > {hidden_cache_gb} GB)"),
        highlight=False,
    )  # fmt: skip

    meta = dict(
        seed=seed, batch_size=batch_size, grad_accum=grad_accum, iters=iters, init=init,
        targets=targets,
        learning_rate=learning_rate, warmup=warmup, weight_decay=weight_decay,
        max_seq_length=max_seq_length, model=model_metadata(model),
        name=model_name or model.config.model_type,
    )  # fmt: skip
    optimizer = optim.AdamW(learning_rate=make_schedule(learning_rate, iters, warmup),
                            weight_decay=weight_decay)  # fmt: skip
    hidden = _Hidden(model, train_set, cached, targets)
    valid = _Hidden(model, valid_set, True, targets)
    step, log = 0, {"train": [], "valid": []}
    t0 = time.perf_counter()
    if resume:
        step, log = _load_checkpoint(paths, layer, optimizer, meta)
        console.print(f"resuming from step {step}", highlight=False)
        if cached:
            _prepare(model, layer, hidden, None, console, progress)
    else:
        fit = None
        if init == "last_block":
            copy_last_block(model, layer)
            fit = _Fit(D)
        if cached or fit is not None:
            _prepare(model, layer, hidden, fit, console, progress)
        if fit is not None:
            fit.solve(layer)
            console.print(f"eh_proj fitted on {fit.tokens} tokens", highlight=False)
        optimizer.init(layer.trainable_parameters())
    mx.eval(layer.parameters(), optimizer.state)
    console.print(f"prepared in {time.perf_counter() - t0:.1f} s", highlight=False)

    loss_and_grad = nn.value_and_grad(layer, lambda lay, *a: mtp_loss(model, lay, *a))
    evaluate = bool(eval_every and valid_set)
    if eval_every and not valid_set:
        console.print("no validation pieces in the data: valid loss skipped", highlight=False)
    if step == 0 and evaluate:
        log["valid"].append([0, _evaluate(model, layer, valid, batch_size, val_batches)])
        console.print(f"step 0: valid loss {log['valid'][-1][1]:.3f}", highlight=False)
    window_loss, window_steps, window_tokens = 0.0, 0, 0.0
    t_window = t_start = time.perf_counter()
    start_step = step
    with _progress(console, progress) as bar:
        task = bar.add_task(
            "finetune --mtp", total=iters, completed=step, loss=float("nan"), tps=0.0, mem=0.0
        )
        while step < iters:
            grads, loss_sum, tokens = None, 0.0, 0.0
            for j in range(grad_accum):
                batch = hidden.batch(batch_at(batches, step * grad_accum + j, seed))
                (loss, n), g = loss_and_grad(layer, *batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, n, grads)  # per micro-batch: the graphs would pile up
                loss_sum += loss.item()
                tokens += n.item()
            if grad_accum > 1:
                grads = tree_map(lambda a: a / grad_accum, grads)
            optimizer.update(layer, grads)
            mx.eval(layer.parameters(), optimizer.state)
            step += 1
            loss_value = loss_sum / grad_accum
            log["train"].append([step, loss_value])
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            window_tokens += tokens
            if step % steps_per_report == 0 or step == iters:
                dt = time.perf_counter() - t_window
                bar.update(
                    task,
                    loss=window_loss / window_steps,
                    tps=window_tokens / max(dt, 1e-9),
                    mem=mx.get_peak_memory() / 1e9,
                )
                window_loss, window_steps, window_tokens = 0.0, 0, 0.0
                t_window = time.perf_counter()
            bar.update(task, completed=step)
            if evaluate and (step % eval_every == 0 or step == iters):
                val = _evaluate(model, layer, valid, batch_size, val_batches)
                log["valid"].append([step, val])
                bar.console.print(f"step {step}: valid loss {val:.3f}", highlight=False)
            if (save_every and step % save_every == 0) or step == iters:
                _save_checkpoint(paths, layer, optimizer, step, log, meta)
            if callback is not None:
                callback(step, {"loss": loss_value, "lr": optimizer.learning_rate.item()})
    console.print(
        f"trained {step - start_step} steps in {time.perf_counter() - t_start:.1f} s; "
        f"MTP head in {paths['head']}",
        highlight=False,
    )
    console.print(plot_losses(log, paths["plot"]), highlight=False)
    return log


def finetune(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    mtp_head_path: str | os.PathLike = HEAD_FILE,
    dtype: mx.Dtype | None = None,
    **train_kwargs,
) -> dict:
    """Load a model and ``train`` an MTP head for it (``mlxllm finetune MODEL --mtp``).
    Returns ``train``'s log."""
    from mlxllm.loader import load

    # everything a user can get wrong is checked before the model loads
    check_mtp_training(**train_kwargs)
    check_head_path(mtp_head_path, train_kwargs.get("resume", False), train_kwargs.get("force"))
    check_mtp_data(data)
    model, tokenizer = load(model_path, dtype=dtype)
    train_kwargs.setdefault("model_name", str(model_path))
    return train(model, tokenizer, data, mtp_head_path=mtp_head_path, **train_kwargs)
