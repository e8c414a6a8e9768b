"""Loader: sharded HF folders, MLX-layout (quantized) folders written by mlx-lm, dtypes, aliases."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from helpers import make_tiny_hf
from mlxllm import load
from mlxllm.errors import MlxllmError
from mlxllm.loader import default_dtype, resolve
from mlxllm.registry import aliases

IDS = [[5, 17, 300, 4000, 12, 9, 31000, 77]]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "hf"
    model = make_tiny_hf("qwen2-untied", path, seed=11)
    return path, model


def test_sharded_folder_with_index(hf_tiny, tmp_path):
    path, torch_model = hf_tiny
    sharded = tmp_path / "sharded"
    torch_model.save_pretrained(sharded, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((path / f).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    a, _ = load(path, dtype=mx.float32)
    b, _ = load(sharded, dtype=mx.float32)
    np.testing.assert_array_equal(np.array(a(mx.array(IDS))), np.array(b(mx.array(IDS))))
    (sharded / shards[-1]).unlink()
    with pytest.raises(MlxllmError, match="missing weight shard"):
        load(sharded)


def test_mlx_layout_quantized_by_mlx_lm_loads_with_same_logits(hf_tiny, tmp_path):
    from mlx_lm import convert
    from mlx_lm import load as mlx_lm_load

    path, _ = hf_tiny
    out = tmp_path / "mlx-q4"
    convert(str(path), str(out), quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    ours, _ = load(out, dtype=mx.float32)
    theirs, _ = mlx_lm_load(str(out))
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    a, b = np.array(ours(mx.array(IDS))), np.array(theirs(mx.array(IDS)))
    print("max |diff| vs mlx-lm on its own 4-bit checkpoint:", np.abs(a - b).max())
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # and the 4-bit model stays close to the float model it came from
    full, _ = load(path, dtype=mx.float32)
    ref = np.array(full(mx.array(IDS)))
    assert np.corrcoef(a.ravel(), ref.ravel())[0, 1] > 0.95


def test_dtypes(hf_tiny):
    path, _ = hf_tiny
    assert default_dtype() == (mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32)
    m, _ = load(path, dtype=mx.bfloat16)
    assert m.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    m, _ = load(path)
    assert m.model.layers[0].mlp.up_proj.weight.dtype == default_dtype()


def test_aliases_cover_every_seed_family():
    repos = set(aliases().values())
    for repo in (
        "deepseek-ai/deepseek-llm-7b-chat",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "deepseek-ai/DeepSeek-V2-Lite-Chat",
        "deepseek-ai/DeepSeek-V2-Chat",
        "deepseek-ai/DeepSeek-V3",
        "deepseek-ai/DeepSeek-R1",
        "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",
        "Qwen/Qwen1.5-7B-Chat",
        "Qwen/Qwen2-7B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-Coder-7B-Instruct",
        "Qwen/QwQ-32B",
        "Qwen/Qwen2.5-7B-Instruct-1M",
        "Qwen/Qwen3-8B",
    ):
        assert repo in repos, repo
    assert aliases()["qwen2.5-7b"] == "Qwen/Qwen2.5-7B-Instruct"


def test_resolve_rejects_unknown_names():
    with pytest.raises(MlxllmError, match="unknown model"):
        resolve("definitely-not-a-model")
