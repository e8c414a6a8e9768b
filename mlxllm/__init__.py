"""mlxllm: a local LLM runtime on MLX for the DeepSeek, Qwen and Llama families.

Public API::

    from mlxllm import load, generate, stream_generate
    model, tokenizer = load("qwen2.5-0.5b")
    print(generate(model, tokenizer, "Hello", max_tokens=32))

Heavy modules (mlx, the models) are imported on first use so that `import mlxllm` and the
CLI's `--help` stay fast.
"""

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "__version__"]


def __getattr__(name):
    if name == "load":
        from mlxllm.loader import load

        return load
    if name in ("generate", "stream_generate"):
        from mlxllm.generation import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'mlxllm' has no attribute {name!r}")
