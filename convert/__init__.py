"""Hugging Face -> MLX conversion (installed as ``mlxllm.convert``); see issue 3."""
