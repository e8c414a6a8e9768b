"""Installed as mlxllm.cli."""
