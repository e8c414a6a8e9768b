"""The ``mlxllm`` command: a thin Typer layer over the Python API.

Nothing heavy is imported at module level: ``mlxllm --help`` must not pay for MLX, the models or
transformers. Each command imports what it needs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys

import typer

app = typer.Typer(
    help="Run DeepSeek, Qwen and Llama models locally on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

MODEL_HELP = "Local folder, alias (see `mlxllm models`) or Hugging Face repo id."


def _fail(msg: str, code: int = 1):
    from rich.console import Console
    from rich.markup import escape

    # escaped: a message may hold brackets ("[write] Unable to write") that Rich would eat
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors(interrupted: str | None = None):
    """The one place where errors become CLI output. Errors caused by input or environment
    (``MlxllmError`` and its kinds, the operating system's: a full disk, a permission) become one
    red line and exit 1; with ``interrupted``, Ctrl-C prints it and exits 130. Anything else is
    a bug: traceback."""
    from mlxllm.errors import MlxllmError, os_error_line

    try:
        yield
    except MlxllmError as e:
        _fail(str(e))
    except OSError as e:
        _fail(os_error_line(e))
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        _fail(interrupted, 130)


def _check_dtype(dtype: str | None):
    from mlxllm.convert import DTYPES  # a light module: std lib only at import

    if dtype is not None and dtype not in DTYPES:
        _fail(f"--dtype {dtype}: use {', '.join(DTYPES)}")


def _load(model: str, dtype: str | None):
    import mlx.core as mx

    from mlxllm.loader import load

    return load(model, dtype=getattr(mx, dtype) if dtype else None)


def _read_prompt(prompt: str) -> str:
    """``-p`` text, or stdin for ``-`` (read as bytes: invalid UTF-8 is one clear line)."""
    from mlxllm.errors import InvalidArgument

    if prompt == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(
                f"the prompt on stdin is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8"
            ) from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that were not UTF-8 (surrogate escapes)
        raise InvalidArgument(
            f"the prompt is not UTF-8 text (at character {e.start}); pass UTF-8, or pipe the "
            "text through iconv and -p -"
        ) from None
    return prompt


def _sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed) -> dict:
    return dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


# Shared option definitions (names match stream_generate's keyword arguments).
MaxTokens = typer.Option(256, "--max-tokens", "-m", help="Maximum new tokens.")
Temperature = typer.Option(0.0, "--temperature", "--temp", help="0 = greedy.")
TopP = typer.Option(1.0, "--top-p", help="Nucleus sampling mass.")
TopK = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off).")
MinP = typer.Option(0.0, "--min-p", help="Drop tokens below min-p x top probability.")
RepPenalty = typer.Option(None, "--repetition-penalty", help="> 1 discourages repeats.")
Seed = typer.Option(None, "--seed", help="Random seed for sampling.")
System = typer.Option(None, "--system", "-s", help="System prompt.")
Dtype = typer.Option(
    None, "--dtype", help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)."
)
Adapter = typer.Option(None, "--adapter", help="LoRA adapter folder (from `mlxllm finetune`).")
AllowLong = typer.Option(
    False,
    "--allow-long-prompt",
    help="Run a prompt longer than the model's context (refused otherwise).",
)

DraftModelOpt = typer.Option(
    None, "--draft-model", help="Speculative decoding: a smaller model with the same tokenizer."
)
NumDraft = typer.Option(3, "--num-draft", help="Tokens drafted per speculative step.")
Mtp = typer.Option(
    None,
    "--mtp/--no-mtp",
    help="Speculate with the checkpoint's MTP layer (DeepSeek-V3/R1; default: when it has one).",
)
MtpHead = typer.Option(None, "--mtp-head", help="An MTP head file from `finetune --mtp`.")


def _drafter(m, tok, draft_model, mtp, mtp_head, dtype, num_draft):
    """The speculative drafter the flags ask for (None: plain decoding)."""
    from mlxllm.errors import InvalidArgument
    from mlxllm.speculative import make_drafter

    if num_draft < 1:
        raise InvalidArgument(f"--num-draft {num_draft}: use 1 or more")
    draft = _load(draft_model, dtype) if draft_model else None
    return make_drafter(m, tok, draft=draft, mtp=mtp, mtp_head=mtp_head)


def _apply_adapter(model, adapter: str | None):
    if adapter is None:
        return model
    from mlxllm.lora.layers import load_adapter

    return load_adapter(model, adapter)


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text, or - to read stdin."),
    max_tokens: int = MaxTokens,
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    min_p: float = MinP,
    repetition_penalty: float | None = RepPenalty,
    seed: int | None = Seed,
    system: str | None = System,
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    no_chat_template: bool = typer.Option(
        False, "--no-chat-template", help="Send the prompt as raw text."
    ),
    dtype: str | None = Dtype,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed and memory."),
    adapter: str | None = Adapter,
    allow_long_prompt: bool = AllowLong,
    draft_model: str | None = DraftModelOpt,
    num_draft: int = NumDraft,
    mtp: bool | None = Mtp,
    mtp_head: str | None = MtpHead,
):
    """Generate text for one prompt and stream it to stdout."""
    from mlxllm.generation.sample import check_sampling

    sampling = _sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    with _user_errors():
        _check_dtype(dtype)
        check_sampling(**sampling, max_tokens=max_tokens)  # before any model loads
        prompt = _read_prompt(prompt)
        m, tok = _load(model, dtype)
        m = _apply_adapter(m, adapter)
        drafter = _drafter(m, tok, draft_model, mtp, mtp_head, dtype, num_draft)
    from mlxllm.generation.stream import stream_generate

    use_template = not no_chat_template and tok.chat_template is not None
    if not no_chat_template and tok.chat_template is None and verbose:
        typer.echo("(no chat template in this model: sending the raw prompt)", err=True)
    from mlxllm.cli.progress import PrefillProgress

    last, progress = None, PrefillProgress(sys.stderr)
    with _user_errors():
        try:
            for last in stream_generate(
                m,
                tok,
                prompt,
                max_tokens=max_tokens,
                system=system,
                stop=stop,
                chat_template=use_template,
                progress=progress,
                allow_long_prompt=allow_long_prompt,
                drafter=drafter,
                num_draft=num_draft,
                **sampling,
            ):
                progress.close()
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            raise typer.Exit(130) from None
    sys.stdout.write("\n")
    if verbose and last is not None:
        typer.echo(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory_gb:.2f} GB",
            err=True,
        )
        if last.acceptance is not None:
            rates = ", ".join(f"{r:.0%}" for r in last.acceptance)
            typer.echo(f"speculative: drafts accepted by position {rates}", err=True)


@app.command()
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-m", help="Maximum tokens per reply."),
    temperature: float = Temperature,
    top_p: float = TopP,
    top_k: int = TopK,
    min_p: float = MinP,
    repetition_penalty: float | None = RepPenalty,
    seed: int | None = Seed,
    system: str | None = System,
    dtype: str | None = Dtype,
    adapter: str | None = Adapter,
    allow_long_prompt: bool = AllowLong,
    draft_model: str | None = DraftModelOpt,
    num_draft: int = NumDraft,
    mtp: bool | None = Mtp,
    mtp_head: str | None = MtpHead,
):
    """Chat in the terminal; the KV cache is kept across turns."""
    from mlxllm.generation.sample import check_sampling

    sampling = _sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    with _user_errors():
        _check_dtype(dtype)
        check_sampling(**sampling, max_tokens=max_tokens)  # before any model loads
        m, tok = _load(model, dtype)
        m = _apply_adapter(m, adapter)
        drafter = _drafter(m, tok, draft_model, mtp, mtp_head, dtype, num_draft)
    if tok.chat_template is None:
        _fail(f"{model} has no chat template; use `mlxllm generate --no-chat-template` instead")
    from mlxllm.cli.chat import ChatSession

    session = ChatSession(
        m,
        tok,
        system=system,
        max_tokens=max_tokens,
        sampling=dict(
            sampling, allow_long_prompt=allow_long_prompt, drafter=drafter, num_draft=num_draft
        ),  # fmt: skip
    )
    with _user_errors():
        session.repl()


@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face folder, repo id or alias."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder."),
    bits: int | None = typer.Option(None, "--bits", "-q", help="Quantize: 2, 3, 4, 5, 6 or 8."),
    group_size: int | None = typer.Option(
        None, "--group-size", help="Quantization group: 32, 64 (default) or 128."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16, float16 or float32."),
    recipe: str | None = typer.Option(
        None, "--recipe", help="uniform, or mixed_4_6 (4-bit with sensitive layers at 6)."
    ),
    mode: str = typer.Option("affine", "--mode", help="affine, mxfp4, mxfp8 or nvfp4."),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it is an earlier mlxllm output (or empty)."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Read pickled *.bin weights (can run code: trusted only)."
    ),
    shard_size_gb: float = typer.Option(2.0, "--shard-size-gb", help="Max output shard size."),
):
    """Convert a Hugging Face checkpoint to MLX safetensors, optionally quantized."""
    from mlxllm.convert import convert as run_convert

    with _user_errors("interrupted; nothing was written"):
        path = run_convert(
            src,
            out,
            bits=bits,
            group_size=group_size,
            dtype=dtype,
            recipe=recipe,
            mode=mode,
            force=force,
            allow_pickle=allow_pickle,
            shard_size_gb=shard_size_gb,
        )
    typer.echo(f"wrote {path}")


# finetune options that only a LoRA run reads: refused with --mtp when given
LORA_ONLY = ("adapter_path", "rank", "scale", "dropout", "num_layers", "dora", "targets",
             "grad_checkpoint", "compiled")  # fmt: skip


@app.command()
def finetune(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(
        ...,
        "--data",
        help="Folder with train.jsonl and valid.jsonl; with --mtp also a folder of text files "
        "(.txt .md .rst .py) or one text file.",
    ),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per batch."),
    learning_rate: float = typer.Option(1e-5, "--learning-rate", help="Peak learning rate."),
    adapter_path: str = typer.Option("adapters", "--adapter-path", help="Output folder."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank."),
    scale: float = typer.Option(20.0, "--scale", help="LoRA scale (alpha / rank)."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the adapter input."),
    num_layers: int = typer.Option(16, "--num-layers", help="Adapt the last N blocks (-1: all)."),
    dora: bool = typer.Option(False, "--dora", help="DoRA: also learn per-row magnitudes."),
    targets: str = typer.Option(
        "q_proj,k_proj,v_proj,o_proj",
        "--targets",
        help="Comma-separated projections to adapt (add gate_proj,up_proj,down_proj for the "
        "MLP or a MoE's experts).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from --adapter-path (--mtp: --mtp-head-path)."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a trained adapter in --adapter-path (--mtp: the head; else refused).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds adapter init, data order and dropout."),
    max_seq_length: int = typer.Option(
        2048, "--max-seq-length", help="Truncate examples (--mtp: cut them into pieces)."
    ),
    save_every: int = typer.Option(100, "--save-every", help="Steps between checkpoints."),
    eval_every: int = typer.Option(200, "--eval-every", help="Steps between validations."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    mask_prompt: bool = typer.Option(
        True, "--mask-prompt/--no-mask-prompt", help="Loss on assistant tokens only."
    ),
    grad_checkpoint: bool = typer.Option(
        False, "--grad-checkpoint", help="Recompute activations in backward (less memory)."
    ),
    compiled: bool = typer.Option(True, "--compile/--no-compile", help="Compile the step."),
    dtype: str | None = Dtype,
    mtp: bool = typer.Option(
        False,
        "--mtp",
        help="Train an MTP head (a draft layer for speculative decoding) on the frozen model "
        "instead of a LoRA adapter.",
    ),
    mtp_head_path: str | None = typer.Option(
        None,
        "--mtp-head-path",
        help="With --mtp: the head file (default mtp_head.safetensors; its checkpoint and log "
        "are written beside it).",
    ),
    mtp_targets: str = typer.Option(
        "model",
        "--mtp-targets",
        help="With --mtp: predict the model's own next choices (model: self-distillation, "
        "what drafts are checked against) or the text's tokens (data).",
    ),
):
    """Train a LoRA (QLoRA on a quantized model, DoRA with --dora) adapter, or with --mtp an
    MTP head for speculative decoding."""
    if mtp:
        # by name: Typer vendors its own click, whose ParameterSource is not click's
        sources = {n: getattr(ctx.get_parameter_source(n), "name", "DEFAULT") for n in LORA_ONLY}
        given = [n for n, src in sources.items() if src not in ("DEFAULT", "DEFAULT_MAP")]
        if given:
            flag = next(o for p in ctx.command.params if p.name == given[0] for o in p.opts)
            _fail(f"{flag} is a LoRA option; --mtp trains no adapter (see --mtp-head-path)")
    elif mtp_head_path is not None:
        _fail("--mtp-head-path names the output of --mtp; add --mtp or drop it")
    elif mtp_targets != "model":
        _fail("--mtp-targets is an --mtp option; add --mtp or drop it")
    out = (mtp_head_path or "mtp_head.safetensors") if mtp else adapter_path
    interrupted = f"interrupted; the last checkpoint of {out} is intact (--resume)"
    with _user_errors(interrupted):
        _check_dtype(dtype)
        import mlx.core as mx

        common = dict(
            seed=seed,
            dtype=getattr(mx, dtype) if dtype else None,
            iters=iters,
            batch_size=batch_size,
            learning_rate=learning_rate,
            save_every=save_every,
            eval_every=eval_every,
            resume=resume,
            grad_accum=grad_accum,
            warmup=warmup,
            max_seq_length=max_seq_length,
            mask_prompt=mask_prompt,
            force=force,
        )
        if mtp:
            from mlxllm.speculative.train import finetune as run_mtp

            run_mtp(model, data, mtp_head_path=out, targets=mtp_targets, **common)
            return
        from mlxllm.lora.train import finetune as run_finetune

        run_finetune(
            model,
            data,
            adapter_path=adapter_path,
            rank=rank,
            scale=scale,
            dropout=dropout,
            num_layers=num_layers if num_layers > 0 else None,
            dora=dora,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            grad_checkpoint=grad_checkpoint,
            compiled=compiled,
            **common,
        )


@app.command()
def fuse(
    model: str = typer.Argument(..., help=MODEL_HELP),
    adapter: str = typer.Option(..., "--adapter", help="Adapter folder."),
    out: str = typer.Option(..., "--out", "-o", help="Output model folder."),
    bits: int | None = typer.Option(None, "--bits", "-q", help="Re-quantize to this many bits."),
    group_size: int | None = typer.Option(
        None, "--group-size", help="Quantization group size with --bits (default 64)."
    ),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, float16 or bfloat16."),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT if it is an earlier mlxllm output (or empty)."
    ),
):
    """Merge an adapter into its base model and write a model folder."""
    from mlxllm.lora import fuse as run_fuse

    with _user_errors("interrupted; nothing was written"):
        path = run_fuse(
            model,
            adapter,
            out,
            bits=bits,
            group_size=group_size,
            dequantize=dequantize,
            dtype=dtype,
            force=force,
        )
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: str | None = typer.Argument(
        None, help=MODEL_HELP + " The default model (requests may name others)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: all)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="MLXLLM_API_KEY", help="Require this key on every route."
    ),
    max_batch: int = typer.Option(32, "--max-batch", help="Most requests decoding at once."),
    gather_ms: float = typer.Option(
        50.0, "--gather-ms", help="Most milliseconds an idle model waits for the rest of a burst "
        "of requests, to prefill them together (0: off)."
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", help="Seconds a request may run before it is cancelled."
    ),
    keep_alive: float = typer.Option(
        300.0, "--keep-alive", help="Seconds a model named by requests stays loaded when idle."
    ),
    dtype: str | None = Dtype,
    adapter: str | None = Adapter,
    draft_model: str | None = DraftModelOpt,
    num_draft: int = NumDraft,
    mtp: bool | None = Mtp,
    mtp_head: str | None = MtpHead,
):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health)."""
    with _user_errors():
        _check_dtype(dtype)
        if not 0 < port < 65536:
            _fail(f"--port {port}: use 1 to 65535")
        if not request_timeout > 0:
            _fail(f"--request-timeout {request_timeout}: use a number of seconds > 0")
        if keep_alive < 0:
            _fail(f"--keep-alive {keep_alive}: use a number of seconds >= 0")
        if not 0 <= gather_ms <= 10_000:
            _fail(f"--gather-ms {gather_ms}: use 0 (off) to 10000 milliseconds")
        engine_kw = {"max_batch": max_batch, "gather": gather_ms / 1000}
        import uvicorn

        from mlxllm.server.app import make_app
        from mlxllm.server.models import Models, Served

        default = None
        if model is not None:
            m, tok = _load(model, dtype)
            m = _apply_adapter(m, adapter)
            drafter = _drafter(m, tok, draft_model, mtp, mtp_head, dtype, num_draft)
            spec = {}
            if drafter is not None:  # the engine drafts with the same model or layer, batched
                from mlxllm.speculative import DraftModel

                if isinstance(drafter, DraftModel):
                    spec = {"draft": drafter.model, "num_draft": num_draft}
                else:
                    spec = {"mtp": drafter.layer, "num_draft": num_draft}
            default = Served(model, m, tok, **engine_kw, **spec)
        elif adapter or draft_model or mtp_head or mtp:
            _fail("--adapter, --draft-model, --mtp and --mtp-head need MODEL (the model they go "
                  "with)")  # fmt: skip
        import mlx.core as mx

        compute = getattr(mx, dtype) if dtype else None
        models = Models(default, keep_alive=keep_alive, dtype=compute, **engine_kw)
        app_ = make_app(models, api_key=api_key, request_timeout=request_timeout)
        uvicorn.run(app_, host=host, port=port, log_level="info")


@app.command()
def models():
    """List model aliases and the Hugging Face repos they point to."""
    from rich.console import Console
    from rich.table import Table

    from mlxllm.registry import aliases

    table = Table("alias", "Hugging Face repo")
    for alias, repo in aliases().items():
        table.add_row(alias, repo)
    Console().print(table)


def _version_callback(value: bool):
    if value:
        from mlxllm import __version__

        typer.echo(f"mlxllm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
):
    pass


OPENBLAS_GLOBS = ("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",)


def _openblas_reexec() -> None:
    """On Linux, restart once with OpenBLAS preloaded when it is installed.

    MLX's CPU wheel bundles a reference BLAS (~1.5 GFLOP/s float32 GEMM on a 2-core x86 box);
    Debian's OpenBLAS (``apt install libopenblas0-pthread``) gives ~55 GFLOP/s, i.e. much faster
    prompt processing. Set MLXLLM_NO_OPENBLAS=1 to skip.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MLXLLM_NO_OPENBLAS"):
        return
    if len(sys.argv) < 2 or sys.argv[1] not in ("generate", "chat", "convert", "finetune", "fuse"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return
    libs = [p for g in OPENBLAS_GLOBS for p in glob.glob(g)]
    if not libs:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [libs[0], preload])))
    env["MLXLLM_NO_OPENBLAS"] = "1"  # never loop
    os.execve(sys.executable, [sys.executable, "-m", "mlxllm.cli.main", *sys.argv[1:]], env)


def main():
    _openblas_reexec()
    app(prog_name="mlxllm")


if __name__ == "__main__":
    main()
