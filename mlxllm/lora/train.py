"""The LoRA training loop: Adam(W) with warmup + cosine decay on a masked cross-entropy.

Resuming is exact: the data order and the dropout key are pure functions of ``(seed, step)``, and
every checkpoint holds the adapter, the optimizer state and the step in ONE file
(``training_state.safetensors``), written to a temp file in the same folder and renamed, so a
crash at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxllm.errors import MlxllmError
from mlxllm.lora.data import batch_at, check_data_dir, collate, load_dataset, make_batches
from mlxllm.lora.layers import (
    DEFAULT_TARGETS,
    adapter_weights,
    apply_lora,
    atomic_save_safetensors,
    atomic_write_text,
    save_adapter,
)

STATE_FILE = "training_state.safetensors"
LOG_FILE = "training_log.json"


# rows of logits per chunk of the fused head + cross-entropy: at most this many logits at a time
HEAD_CHUNK_ELEMS = 1 << 24


def masked_loss(
    model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, grad: bool = True
):
    """Mean cross-entropy over masked-in targets; returns ``(loss, n_tokens)``.

    ``grad=False`` (evaluation) skips the fused gradient.

    The vocabulary projection and the cross-entropy run fused over row chunks
    (``head_cross_entropy``), so the ``[B, L, vocab]`` logits and their gradient never exist in
    full (for Qwen's 152K vocabulary at batch 4 x 2048 tokens that would be 5 GB in float32).
    """
    h = model.model(inputs)  # [B, L, dim]
    n = mask.sum()
    D = h.shape[-1]
    args = (model.head, h.reshape(-1, D), targets.reshape(-1), mask.reshape(-1))
    ce = head_cross_entropy(*args) if grad else head_cross_entropy_value(*args)
    return ce / mx.maximum(n, 1), n


def _chunk_rows(head, h: mx.array) -> int:
    vocab = head(h[:1]).shape[-1]  # a one-row probe's shape; nothing is computed
    return max(1, HEAD_CHUNK_ELEMS // vocab)


def _chunk_loss(logits: mx.array, targets: mx.array, mask: mx.array):
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return ((lse - picked) * mask).sum(), lse


def head_cross_entropy_value(head, h: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """``head_cross_entropy`` without its gradient (evaluation), chunk by chunk."""
    rows = _chunk_rows(head, h)
    losses = []
    for i in range(0, h.shape[0], rows):
        logits = head(h[i : i + rows]).astype(mx.float32)
        losses.append(_chunk_loss(logits, targets[i : i + rows], mask[i : i + rows])[0])
        mx.eval(losses[-1])  # one chunk's logits at a time
    return sum(losses)


def head_cross_entropy(head, h: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """``sum(cross_entropy(head(h), targets) * mask)`` without materializing all the logits.

    Rows are processed in chunks of at most ``HEAD_CHUNK_ELEMS`` logits. The gradient with
    respect to ``h`` is computed chunk by chunk in the forward pass (``(softmax - onehot) *
    mask``, pulled back through ``head`` with ``mx.vjp``) and returned by a custom VJP: the same
    FLOPs as autodiff through full logits, a fraction of the memory. ``head``'s own weights get
    no gradient (adapters never train the vocabulary projection).

    Args:
        head: ``[N, dim] -> [N, vocab]``.
        h: ``[N, dim]``; targets: ``[N]`` int; mask: ``[N]`` 0/1.
    """

    def chunk_loss_and_grad(hc, tc, mc):
        logits = head(hc).astype(mx.float32)
        loss, lse = _chunk_loss(logits, tc, mc)
        onehot = mx.arange(logits.shape[-1]) == tc[:, None]
        dlogits = (mx.exp(logits - lse[:, None]) - onehot) * mc[:, None]
        (dh,) = mx.vjp(head, [hc], [dlogits.astype(hc.dtype)])[1]
        # one node per chunk holding both results, so the chunk's logits die before the next
        # chunk's are computed (evaluation order follows the graph)
        return mx.concatenate([dh.reshape(-1).astype(mx.float32), loss[None]])

    @mx.custom_function
    def fused(h, targets, mask):
        N, D = h.shape
        rows = _chunk_rows(head, h)
        packed = [
            chunk_loss_and_grad(h[i : i + rows], targets[i : i + rows], mask[i : i + rows])
            for i in range(0, N, rows)
        ]
        loss = sum(p[-1] for p in packed)
        dh = mx.concatenate([p[:-1].reshape(-1, D) for p in packed]).astype(h.dtype)
        return loss, dh

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets, mask = primals
        d_loss = cotangents[0]
        return (
            outputs[1] * d_loss.astype(outputs[1].dtype),
            mx.zeros_like(targets),
            mx.zeros_like(mask),
        )

    return fused(h, targets, mask)[0]


def make_schedule(lr: float, iters: int, warmup: int, min_lr_ratio: float = 0.1):
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * ratio``."""
    decay = optim.cosine_decay(lr, max(1, iters - warmup), lr * min_lr_ratio)
    if warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), decay], [warmup])


def memory_estimate(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, float]:
    """Rough bytes of a training step: weights, adapters (+ grads + 2 Adam moments) and
    activations kept for the backward pass (from the first adapted block on, plus one chunk of
    logits, see ``masked_loss``)."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    adapters = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    cfg = model.config
    adapted = [
        i for i, layer in enumerate(model.layers) if tree_flatten(layer.trainable_parameters())
    ]
    n_blocks = len(model.layers) - (adapted[0] if adapted else len(model.layers))
    tokens = batch_size * seq_len
    heads = getattr(cfg, "num_attention_heads", 1)
    # per block: ~10 hidden-sized tensors, 3 MLP-sized, the attention scores; float32 on CPU
    per_block = tokens * (10 * cfg.hidden_size + 3 * cfg.intermediate_size + heads * seq_len) * 4
    # the fused head + cross-entropy holds one chunk's logits, probabilities and gradient
    # (rounded up to whole rows) and d/dh for every token
    rows = max(1, HEAD_CHUNK_ELEMS // cfg.vocab_size)
    logits = min(tokens, rows) * cfg.vocab_size * 4 * 3 + tokens * cfg.hidden_size * 4
    return {
        "weights": weights,
        "adapters": adapters,
        "optimizer": 3 * adapters,  # gradients + Adam m and v
        "activations": n_blocks * per_block + logits,
    }


def _fmt_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _evaluate(model, examples, batch_size: int, max_batches: int | None = None) -> float:
    """Token-weighted validation loss over the length-sorted batches (no shuffle)."""
    batches = make_batches(examples, min(batch_size, len(examples)))
    if max_batches:
        batches = batches[:max_batches]
    total, count = 0.0, 0.0
    for idx in batches:
        x, y, m = (mx.array(a) for a in collate([examples[i] for i in idx]))
        loss, n = masked_loss(model, x, y, m, grad=False)
        mx.eval(loss, n)  # one batch at a time bounds memory
        total += loss.item() * n.item()
        count += n.item()
    return total / max(count, 1)


def check_training(
    iters: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 1e-5,
    grad_accum: int = 1,
    max_seq_length: int = 2048,
    warmup: int = 0,
    save_every: int = 100,
    eval_every: int = 200,
    weight_decay: float = 0.0,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    num_layers: int | None = None,
    seed: int = 0,
    **_,
) -> None:
    """Refuse settings that cannot train, with the fix, before any model loads."""
    import math

    def need(ok: bool, msg: str):
        if not ok:
            raise MlxllmError(msg)

    need(iters >= 1, f"--iters {iters}: train at least 1 step")
    need(batch_size >= 1, f"--batch-size {batch_size}: use 1 or more examples per batch")
    need(grad_accum >= 1, f"--grad-accum {grad_accum}: use 1 (no accumulation) or more")
    need(max_seq_length >= 2, f"--max-seq-length {max_seq_length}: a row needs at least 2 tokens")
    need(rank >= 1, f"--rank {rank}: the LoRA rank must be 1 or more")
    need(0.0 <= dropout < 1.0, f"--dropout {dropout}: use a probability in [0, 1)")
    for name, v in (("--learning-rate", learning_rate), ("--scale", scale)):
        need(math.isfinite(v) and v > 0, f"{name} {v}: use a positive number")
    need(math.isfinite(weight_decay) and weight_decay >= 0, "weight decay must be >= 0")
    need(warmup >= 0, f"--warmup {warmup}: use 0 or more steps")
    for name, v in (("--save-every", save_every), ("--eval-every", eval_every)):
        need(v >= 0, f"{name} {v}: use 0 (only at the end) or more steps")
    need(num_layers is None or num_layers >= 1, f"--num-layers {num_layers}: use 1 or more")
    need(0 <= seed < 2**32, f"--seed {seed}: use a number from 0 to 2**32 - 1")


ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json", STATE_FILE)


def check_adapter_path(folder: str | os.PathLike, resume: bool, force: bool) -> Path:
    """Where a run writes its adapter, checked before anything loads: ``resume`` needs a
    checkpoint there; a trained adapter is replaced only with ``force``."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MlxllmError(f"--adapter-path {folder} is a file; choose a folder")
    if resume and force:
        raise MlxllmError("--resume continues the adapter that --force would replace; pick one")
    if resume:
        if not (folder / STATE_FILE).is_file():
            raise MlxllmError(f"nothing to resume: {folder / STATE_FILE} does not exist")
    elif not force and any((folder / f).exists() for f in ADAPTER_FILES):
        raise MlxllmError(
            f"{folder} already holds a trained adapter; pass --resume to continue it or --force "
            "to replace it (or choose another --adapter-path)"
        )
    return folder


def _save_checkpoint(folder: Path, model, optimizer, step: int, log: dict, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # made at the first checkpoint, not before
    arrays = {f"adapter.{k}": v for k, v in adapter_weights(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    atomic_save_safetensors(
        folder / STATE_FILE, arrays, {"step": str(step), "meta": json.dumps(meta)}
    )
    save_adapter(model, folder, {"step": step})
    atomic_write_text(folder / LOG_FILE, json.dumps(log))


def _load_checkpoint(folder: Path, model, optimizer, meta: dict) -> tuple[int, dict]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise MlxllmError(f"nothing to resume: {path} does not exist")
    arrays, metadata = mx.load(str(path), return_metadata=True)
    saved = json.loads(metadata.get("meta", "{}"))
    diff = {k for k in meta if saved.get(k) != meta[k]}
    if diff:
        raise MlxllmError(
            f"cannot resume from {folder}: settings changed ({', '.join(sorted(diff))}); "
            "use the same settings or another --adapter-path"
        )
    adapter = {k[len("adapter.") :]: v for k, v in arrays.items() if k.startswith("adapter.")}
    model.load_weights(list(adapter.items()), strict=False)
    opt = [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    optimizer.state = tree_unflatten(opt)
    log_path = folder / LOG_FILE
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"train": [], "valid": []}
    step = int(metadata["step"])
    # drop log entries written after the checkpoint (a crash between the two)
    log = {k: [e for e in v if e[0] <= step] for k, v in log.items()}
    return step, log


def plot_losses(log: dict, path: Path) -> str:
    """A PNG of train/valid loss if matplotlib is installed; returns a one-line message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: `pip install matplotlib` enables it"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("train", "valid"):
        if log.get(name):
            steps, losses = zip(*log[name], strict=True)
            ax.plot(steps, losses, label=name, marker="o" if name == "valid" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return f"loss plot: {path}"


def train(
    model: nn.Module,
    tokenizer,
    data_dir: str | os.PathLike,
    iters: int = 1000,
    batch_size: int = 4,
    learning_rate: float = 1e-5,
    adapter_path: str | os.PathLike = "adapters",
    save_every: int = 100,
    eval_every: int = 200,
    seed: int = 0,
    resume: bool = False,
    grad_accum: int = 1,
    warmup: int = 0,
    weight_decay: float = 0.0,
    max_seq_length: int = 2048,
    mask_prompt: bool = True,
    val_batches: int | None = 25,
    steps_per_report: int = 10,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    grad_checkpoint: bool = False,
    compiled: bool = True,
    force: bool = False,
) -> dict:
    """Train the adapter parameters of ``model`` (see ``apply_lora``) on a data folder.

    Args:
        model: a model with adapters applied (only adapter parameters trainable).
        tokenizer: its tokenizer.
        data_dir: folder with train.jsonl and valid.jsonl.
        iters: optimizer steps.
        batch_size: examples per micro-batch.
        learning_rate: peak learning rate.
        adapter_path: output folder (adapter, config, training state, log, plot).
        save_every: steps between checkpoints (a checkpoint is also written at the end).
        eval_every: steps between validation losses (also at step 0 and at the end).
        seed: seeds the data order and dropout.
        resume: continue from ``adapter_path``'s checkpoint.
        grad_accum: micro-batches whose gradients are averaged per optimizer step.
        warmup: linear warmup steps before the cosine decay.
        weight_decay: AdamW weight decay.
        max_seq_length: examples are truncated to this many tokens.
        mask_prompt: train on assistant/completion tokens only.
        val_batches: cap on validation batches (None: all).
        steps_per_report: steps between progress updates of the loss.
        progress: show a Rich progress bar and messages.
        callback: ``callback(step, info)`` after every step (``info``: loss, lr, tokens).
        grad_checkpoint: recompute each adapted block's activations in the backward pass
            (less memory, ~30% more compute).
        compiled: run the step through ``mx.compile`` (batches are padded to a multiple of 32
            tokens so that few shapes are compiled).
        force: replace a trained adapter already in ``adapter_path`` (else refused, unless
            ``resume``).

    Returns:
        The log: ``{"train": [[step, loss], ...], "valid": [[step, loss], ...]}``.
    """
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    settings = dict(iters=iters, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    settings.update(grad_accum=grad_accum, max_seq_length=max_seq_length, warmup=warmup)
    check_training(**settings, save_every=save_every, eval_every=eval_every,
                   weight_decay=weight_decay)  # fmt: skip
    folder = check_adapter_path(adapter_path, resume, force)
    data = load_dataset(data_dir, tokenizer, max_seq_length, mask_prompt)
    train_set, valid_set = data["train"], data["valid"]
    batches = make_batches(train_set, batch_size)

    longest = max(len(e.ids) for e in train_set)
    est = memory_estimate(model, batch_size, longest)
    console.print(
        "memory estimate: "
        + ", ".join(f"{k} {_fmt_gb(v)}" for k, v in est.items())
        + f" = {_fmt_gb(sum(est.values()))} (batch {batch_size} x {longest} tokens)",
        highlight=False,
    )
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    console.print(
        f"trainable: {n_train / 1e6:.3f}M of {n_total / 1e6:.1f}M parameters "
        f"({100 * n_train / max(n_total, 1):.3f}%), {len(train_set)} train / "
        f"{len(valid_set)} valid examples",
        highlight=False,
    )

    schedule = make_schedule(learning_rate, iters, warmup)
    if weight_decay:
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    else:  # the same update without AdamW's decay pass (one temporary per parameter less)
        optimizer = optim.Adam(learning_rate=schedule)
    meta = dict(
        seed=seed,
        batch_size=batch_size,
        grad_accum=grad_accum,
        iters=iters,
        learning_rate=learning_rate,
        warmup=warmup,
        adapter=getattr(model, "adapter_config", {}),
    )
    step, log = 0, {"train": [], "valid": []}
    if resume:
        step, log = _load_checkpoint(folder, model, optimizer, meta)
        console.print(f"resuming from step {step}", highlight=False)

    if grad_checkpoint:
        checkpoint_blocks(model)
    if not resume:
        optimizer.init(model.trainable_parameters())  # the compiled step needs the state tree
    step_fn = make_step(model, optimizer, grad_accum, compiled=compiled)

    def micro_batch(index: int):
        idx = batch_at(batches, index, seed)
        return (mx.array(a) for a in collate([train_set[i] for i in idx], 0, 32, max_seq_length))

    model.train()
    mx.reset_peak_memory()
    window_loss, window_steps, window_tokens, t_window = 0.0, 0, 0.0, time.perf_counter()
    t_start, start_step = time.perf_counter(), step
    if step == 0 and eval_every:
        model.eval()
        log["valid"].append([0, _evaluate(model, valid_set, batch_size, val_batches)])
        model.train()
        console.print(f"step 0: valid loss {log['valid'][-1][1]:.3f}", highlight=False)

    bar = _progress(console, progress)
    with bar:
        task = bar.add_task(
            "finetune", total=iters, completed=step, loss=float("nan"), tps=0.0, mem=0.0
        )
        while step < iters:
            grads, loss_sum, tokens = None, 0.0, 0.0
            for j in range(grad_accum):
                # dropout draws from a key fixed by (seed, step, micro-batch): exact resume
                mx.random.seed(seed * 1_000_003 + step * grad_accum + j)
                x, y, m = micro_batch(step * grad_accum + j)
                loss, n, grads = step_fn(x, y, m, grads, j == grad_accum - 1)
                # evaluate per micro-batch (the graphs would otherwise pile up); after the last
                # one this applies the optimizer update
                mx.eval(loss, n, grads, model.trainable_parameters(), optimizer.state)
                loss_sum += loss.item()
                tokens += n.item()
            step += 1
            loss_value = loss_sum / grad_accum
            log["train"].append([step, loss_value])
            window_loss += loss_value
            window_steps += 1
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
            if eval_every and (step % eval_every == 0 or step == iters):
                model.eval()
                val = _evaluate(model, valid_set, batch_size, val_batches)
                model.train()
                log["valid"].append([step, val])
                bar.console.print(f"step {step}: valid loss {val:.3f}", highlight=False)
            if (save_every and step % save_every == 0) or step == iters:
                _save_checkpoint(folder, model, optimizer, step, log, meta)
            if callback is not None:
                callback(step, {"loss": loss_value, "lr": optimizer.learning_rate.item()})

    model.eval()
    elapsed = time.perf_counter() - t_start
    console.print(
        f"trained {step - start_step} steps in {elapsed:.1f} s; peak memory "
        f"{mx.get_peak_memory() / 1e9:.2f} GB; adapter in {folder}",
        highlight=False,
    )
    if data.get("test"):  # the optional test split: scored once, at the end
        test_loss = _evaluate(model, data["test"], batch_size, None)
        console.print(f"test loss {test_loss:.3f} ({len(data['test'])} examples)", highlight=False)
        log["test"] = [[step, test_loss]]
        atomic_write_text(folder / LOG_FILE, json.dumps(log))
    console.print(plot_losses(log, folder / "loss.png"), highlight=False)
    return log


def make_step(model: nn.Module, optimizer, grad_accum: int, compiled: bool = True):
    """``step(x, y, mask, grads, update) -> (loss, n_tokens, grads)``.

    Adds this micro-batch's gradients to ``grads`` (None for the first); with ``update`` it
    averages them over ``grad_accum``, applies the optimizer and returns ``grads=None``.
    Compiled, the model, optimizer and random state are the function's implicit inputs and
    outputs; build it after the optimizer state exists (``optimizer.init`` or a resume).
    """
    loss_and_grad = nn.value_and_grad(model, masked_loss)

    def step(x, y, m, grads, update: bool):
        (loss, n), g = loss_and_grad(model, x, y, m)
        if grads is not None:
            g = tree_map(lambda a, b: a + b, grads, g)
        if update:
            if grad_accum > 1:
                g = tree_map(lambda a: a / grad_accum, g)
            optimizer.update(model, g)
            g = None
        return loss, n, g

    if not compiled:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing for every block that holds trainable (adapter) parameters.

    Refuses adapter dropout: the backward pass would recompute the block with new dropout
    masks, so the gradients would not belong to the forward pass.
    """
    if getattr(model, "adapter_config", {}).get("dropout"):  # set by apply_lora
        raise MlxllmError(
            "gradient checkpointing with adapter dropout would recompute with new dropout "
            "masks; drop --dropout or --grad-checkpoint"
        )
    for block in model.layers:
        if tree_flatten(block.trainable_parameters()):
            block.__class__ = _checkpointed(type(block))


@cache
def _checkpointed(cls: type) -> type:
    def __call__(self, x, *args, **kwargs):
        def inner(params, x):
            self.update(params)
            return cls.__call__(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TextColumn("peak {task.fields[mem]:.2f} GB"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def finetune(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    adapter_path: str | os.PathLike = "adapters",
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    num_layers: int | None = 16,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    dora: bool = False,
    seed: int = 0,
    dtype: mx.Dtype | None = None,
    **train_kwargs,
) -> dict:
    """Load a model, add adapters and ``train`` them (the ``mlxllm finetune`` command).

    A quantized model (an MLX folder with a ``quantization`` block) trains as QLoRA: the packed
    base stays frozen. Returns ``train``'s log.
    """
    from mlxllm.loader import load

    # everything a user can get wrong is checked before the model loads
    check_training(rank=rank, scale=scale, dropout=dropout, num_layers=num_layers, seed=seed,
                   **train_kwargs)  # fmt: skip
    check_adapter_path(adapter_path, train_kwargs.get("resume", False), train_kwargs.get("force"))
    check_data_dir(data_dir)
    model, tokenizer = load(model_path, dtype=dtype)
    mx.random.seed(seed)  # the adapters' initial lora_a
    apply_lora(model, rank, scale, dropout, targets, num_layers, dora)
    mx.eval(model.trainable_parameters())
    object.__setattr__(
        model, "adapter_config", {**model.adapter_config, "base_model": str(model_path)}
    )
    return train(model, tokenizer, data_dir, adapter_path=adapter_path, seed=seed, **train_kwargs)
