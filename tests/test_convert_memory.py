"""Streaming is proven by memory: converting 4 shards of ~1 GB must not hold the model.

A synthetic float16 Llama checkpoint (40 layers of d=2048, 4.2 GB in 4 shards) is written
tensor by tensor, then converted to 4 bits in a subprocess that reports how far its peak RSS
(VmHWM) rose above its RSS just before converting. A converter that loaded the whole model
would rise by more than 4 GB; the bound is ~1.6 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx

from mlxllm.convert.safetensors_io import StreamingWriter, write_index

CONFIG = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=40,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    torch_dtype="float16",
)


def _layer(i: int) -> dict:
    d, f = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (d, d),
        "self_attn.v_proj.weight": (d, d),
        "self_attn.o_proj.weight": (d, d),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    return {p + k: _tensor(s, i) for k, s in shapes.items()}


def _tensor(shape, seed: int) -> mx.array:
    """Cheap, varied, deterministic float16 values (random generation takes minutes here)."""
    cols = mx.sin(mx.arange(shape[-1]) * 0.37 + seed) * 0.02
    if len(shape) == 1:
        return cols.astype(mx.float16)
    rows = mx.cos(mx.arange(shape[0]) * 0.11 + seed)[:, None]
    return (rows * cols).astype(mx.float16)


def _write_synthetic(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    writer = StreamingWriter(folder, max_bytes=int(1.2e9))
    d, v = CONFIG["hidden_size"], CONFIG["vocab_size"]
    writer.add("model.embed_tokens.weight", _tensor((v, d), -1))
    for i in range(CONFIG["num_hidden_layers"]):
        for name, a in _layer(i).items():
            writer.add(name, a)
        if i % 10 == 9:
            writer.flush_shard()  # 4 shards of ~1 GB
    writer.add("model.norm.weight", mx.ones((d,), mx.float16))
    writer.add("lm_head.weight", _tensor((v, d), -2))
    write_index(folder, writer.close(), writer.total_bytes)


CHILD = """
import json, sys
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from mlxllm.convert import convert
import mlx.core as mx
base = rss('VmRSS:')
convert(sys.argv[1], sys.argv[2], bits=4, group_size=64, progress=False)
print(json.dumps({"base": base, "peak": rss('VmHWM:')}))
"""


def test_converting_4x1gb_shards_keeps_peak_rss_bounded(tmp_path):
    src = tmp_path / "synthetic"
    _write_synthetic(src)
    shards = sorted(src.glob("*.safetensors"))
    sizes = [f.stat().st_size / 1e9 for f in shards]
    print("source shards (GB):", [round(s, 2) for s in sizes])
    assert len(shards) >= 4 and sum(sizes) > 4.0
    out = tmp_path / "q4"
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    rise = (m["peak"] - m["base"]) / 1e9
    print(f"peak RSS rose by {rise:.2f} GB while converting {sum(sizes):.2f} GB")
    assert rise <= 1.6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < 0.35 * sum(sizes) * 1e9
