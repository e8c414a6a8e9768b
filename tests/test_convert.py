"""`mlxllm convert`: round trips, quantization, recipes, FP8 ingest, interop with mlx-lm, and
bad input (one clear line, non-zero exit, no OUT left behind)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import make_tiny_hf
from mlxllm import load
from mlxllm.cli.main import app
from mlxllm.convert import convert
from mlxllm.errors import MlxllmError
from mlxllm.models.transforms import dequant_fp8_blockwise
from mlxllm.quant import bits_per_weight, make_predicate, quantize_model

IDS = mx.array([[5, 17, 300, 4000, 12, 9, 31000, 77, 1, 2, 3, 40000]])
runner = CliRunner()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "hf"
    make_tiny_hf("llama", path, seed=21, std=0.02)
    return path


@pytest.fixture(scope="module")
def ref_logits(hf):
    model, _ = load(hf, dtype=mx.float32)
    return np.array(model(IDS))


def _logits(path):
    model, _ = load(path, dtype=mx.float32)
    return np.array(model(IDS))


def _rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def _no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_float_round_trip_is_exact_in_float32(hf, ref_logits, tmp_path):
    out = convert(hf, tmp_path / "f32", dtype="float32", progress=False)
    np.testing.assert_array_equal(_logits(out), ref_logits)
    card = (out / "README.md").read_text()
    assert str(hf) in card and "float32" in card
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    out16 = convert(hf, tmp_path / "bf16", progress=False)
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # bfloat16 keeps ~3 significant digits
    assert _rel_rms(_logits(out16), ref_logits) < 1e-2


# Stated tolerances (relative RMS logit error on this 2-layer random model, measured ~0.011 at 8
# bits and ~0.17 at 4 bits): random networks amplify weight noise far more than trained ones;
# quality on real weights is measured in benchmarks/quality.py.
@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_quantized_round_trip_matches_in_memory_transform(hf, ref_logits, tmp_path, bits, tol):
    out = convert(hf, tmp_path / f"q{bits}", bits=bits, group_size=32, progress=False)
    got = _logits(out)
    err = _rel_rms(got, ref_logits)
    print(f"{bits}-bit g32: relative RMS logit error {err:.4f}")
    assert err < tol  # stated tolerance: 1% at 8 bits, 12% at 4 bits on this random model
    # the converter and the in-memory transform use the same predicate: same model
    # (in bfloat16 like the converter's default output, then computed in float32 like load)
    model, _ = load(hf, dtype=mx.bfloat16)
    quantize_model(model, make_predicate("uniform", bits, 32))
    model.set_dtype(mx.float32)
    np.testing.assert_allclose(got, np.array(model(IDS)), rtol=1e-5, atol=1e-5)


def test_mixed_recipe_and_mlx_lm_reads_our_output(hf, tmp_path):
    from mlx_lm import load as mlx_lm_load

    out = convert(hf, tmp_path / "mixed", recipe="mixed_4_6", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    # this model is mostly embedding: lifting lm_head to 6 bits would break the 5.0 budget,
    # so only v_proj / down_proj of the outer layers are lifted
    assert q["bits"] == 4 and "lm_head" not in q
    assert q["model.layers.0.mlp.down_proj"]["bits"] == 6
    assert q["model.layers.1.self_attn.v_proj"]["bits"] == 6
    assert "model.layers.0.self_attn.q_proj" not in q  # the 4-bit default
    w = mx.load(str(out / "model.safetensors"))
    bpw = bits_per_weight(w, q)
    print(f"mixed_4_6 g64: {bpw:.3f} bits/weight")
    assert bpw <= 5.0
    ours = _logits(out)
    theirs_model, _ = mlx_lm_load(str(out))
    theirs_model.set_dtype(mx.float32)
    theirs = np.array(theirs_model(IDS))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_mixed_recipe_budget_on_the_real_qwen_shape():
    """On Qwen2.5-0.5B's shape (built lazily, no weights) the recipe lifts lm_head first, then
    the outermost layers' v_proj/down_proj, and stays within 5.0 bits per weight."""
    from helpers import QWEN, fixture_model
    from mlxllm.models import build_model
    from mlxllm.quant import _mixed_upgrades

    model = build_model(json.loads((fixture_model(QWEN) / "config.json").read_text()))
    up = _mixed_upgrades(model, 64, 5.0)
    assert "lm_head" in up and "model.layers.0.mlp.down_proj" in up
    assert "model.layers.12.mlp.down_proj" not in up  # a middle layer stays at 4 bits
    sizes = {p: m.weight.size for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    total = sum(sizes.values())
    bits = sum(n * (6.5 if p in up else 4.5) for p, n in sizes.items())
    assert bits / total <= 5.0


def test_mx_formats_when_supported(hf, ref_logits, tmp_path):
    from mlxllm.quant import supported_modes

    modes = [m for m in ("mxfp4", "mxfp8", "nvfp4") if m in supported_modes()]
    assert modes, "MLX 0.32 supports the MX formats"
    for mode in modes:
        out = convert(hf, tmp_path / mode, mode=mode, progress=False)
        q = json.loads((out / "config.json").read_text())["quantization"]
        assert q["mode"] == mode
        # the model card states what was written (it once said the ignored --bits/--group-size)
        want = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}[mode]
        assert (q["bits"], q["group_size"]) == want
        assert f"{want[0]}-bit, group {want[1]}, {mode}" in (out / "README.md").read_text()
        err = _rel_rms(_logits(out), ref_logits)
        print(f"{mode}: relative RMS logit error {err:.3f}")
        assert err < 0.35  # measured 0.05 (mxfp8) to 0.25 (mxfp4)


def _fp8_quantize(w: torch.Tensor, block=128):
    """Blockwise e4m3 as DeepSeek-V3 stores it: weight bytes + per-tile ``weight_scale_inv``."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(br, bc)
    q = torch.zeros_like(w)
    for i in range(br):
        for j in range(bc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile / s
    return q.to(torch.float8_e4m3fn), scale


def test_dequant_fp8_blockwise_matches_torch():
    w = torch.randn(300, 260)
    q, s = _fp8_quantize(w)
    ref = q.float() * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    got = dequant_fp8_blockwise(mx.array(q.view(torch.uint8).numpy()), mx.array(s.numpy()))
    np.testing.assert_array_equal(np.array(got), ref.numpy())
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4, plus the scale's granularity
    assert np.all(np.abs(ref.numpy() - w.numpy()) <= 2**-4 * np.abs(w.numpy()) + 1e-2)


def test_fp8_checkpoint_is_dequantized_while_converting(hf, tmp_path):
    """A tiny FP8 checkpoint written here, with scales in a different shard than weights."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "fp8"
    shutil.copytree(hf, src)
    state = load_file(src / "model.safetensors")
    weights, scales, deq = {}, {}, {}
    for k, v in state.items():
        if k.endswith("proj.weight"):
            q, s = _fp8_quantize(v)
            weights[k], scales[f"{k}_scale_inv"] = q, s
            deq[k] = (
                q.float()
                * s.repeat_interleave(128, 0)[: v.shape[0]].repeat_interleave(128, 1)[
                    :, : v.shape[1]
                ]
            )
        else:
            weights[k] = deq[k] = v
    (src / "model.safetensors").unlink()
    save_file(weights, src / "model-00001-of-00002.safetensors")
    save_file(scales, src / "model-00002-of-00002.safetensors")
    wmap = {k: "model-00001-of-00002.safetensors" for k in weights}
    wmap.update({k: "model-00002-of-00002.safetensors" for k in scales})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    # the reference: the same checkpoint with the dequantized float weights
    ref_dir = tmp_path / "deq"
    shutil.copytree(hf, ref_dir)
    save_file({k: v.contiguous() for k, v in deq.items()}, ref_dir / "model.safetensors")

    out = convert(src, tmp_path / "from-fp8", dtype="float32", progress=False)
    keys = [k for f in out.glob("*.safetensors") for k in mx.load(str(f))]
    assert keys and not any("scale_inv" in k for k in keys)
    np.testing.assert_allclose(_logits(out), _logits(ref_dir), rtol=1e-5, atol=1e-5)
    # the runtime loader ingests the FP8 folder directly too
    np.testing.assert_allclose(_logits(src), _logits(ref_dir), rtol=1e-5, atol=1e-5)


def _cli_fails(args, out, needle):
    res = runner.invoke(app, ["convert", *args, "-o", str(out)])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1 and needle in lines[0], res.stderr
    left = _no_leftovers(out.parent, out.name)
    assert left == [] or left == [out.name] and needle in ("exists", "did not write")


def test_bad_input_is_one_line_and_leaves_nothing(hf, tmp_path):
    work = tmp_path / "work"
    bad = work / "bad"
    shutil.copytree(hf, bad)
    out = work / "out"
    # truncated safetensors
    w = bad / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3])
    _cli_fails([str(bad)], out, "truncated")
    w.write_bytes(data)
    # a shard missing from the index
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}})
    )
    _cli_fails([str(bad)], out, "missing weight shard")
    (bad / "model.safetensors.index.json").unlink()
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "model_type"})
    )
    _cli_fails([str(bad)], out, "model_type")
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="bloom")))
    _cli_fails([str(bad)], out, "bloom")
    (bad / "config.json").write_text(json.dumps(cfg))
    # OUT exists: refused without --force, and left untouched
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _cli_fails([str(bad)], out, "exists")
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only an empty folder or an earlier output of ours: never foreign files
    _cli_fails([str(bad), "--force"], out, "did not write")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    for _ in range(2):  # the empty folder, then our own earlier output
        res = runner.invoke(app, ["convert", str(bad), "-o", str(out), "--force", "-q", "8"])
        assert res.exit_code == 0, res.output
        assert (out / "config.json").exists() and (out / ".mlxllm-output.json").exists()
    (out / "notes.txt").write_text("mine")  # added to our output: foreign again
    _cli_fails([str(bad), "--force"], out, "did not write")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["bad", "out"]  # no temp folders


def test_pickles_refused_unless_allowed(hf, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(hf, src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(MlxllmError, match="allow-pickle"):
        convert(src, tmp_path / "o1", progress=False)
    out = convert(src, tmp_path / "o2", dtype="float32", allow_pickle=True, progress=False)
    np.testing.assert_allclose(_logits(out), _logits(hf), rtol=1e-6, atol=1e-6)


def test_interrupt_midway_leaves_no_output(hf, tmp_path, monkeypatch):
    from mlxllm.convert import safetensors_io

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io, "_to_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(hf, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- MoE routers: float32 and never quantized (one rule: transforms.is_router) -------------

# tensors the rule must cover (source: the checkpoints' own names, see test_deepseek and
# test_moe_qwen): DeepSeek-V3's gate (not a linear) and its noaux_tc correction bias; Qwen2-MoE's
# router linear and the shared expert's sigmoid gate
MOE_ROUTERS = {
    "deepseek_v3": [
        f"model.layers.{i}.mlp.gate.{p}"
        for i in (1, 2)
        for p in ("weight", "e_score_correction_bias")
    ],
    "qwen2_moe": ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert_gate.weight"],
}


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    from test_deepseek import make_tiny_deepseek
    from test_moe_qwen import _make_tiny

    v3 = tmp_path_factory.mktemp("v3") / "hf"
    make_tiny_deepseek("v3-yarn", v3, seed=3)
    qwen = tmp_path_factory.mktemp("qwen2_moe") / "hf"
    _make_tiny("qwen2_moe", qwen, seed=4)
    return {"deepseek_v3": v3, "qwen2_moe": qwen}


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _is_router_tensor(name: str) -> bool:
    from mlxllm.models.transforms import is_router

    return is_router(name.rpartition(".")[0])


@pytest.mark.parametrize("recipe", [None, "uniform", "mixed_4_6"])
@pytest.mark.parametrize("family", list(MOE_ROUTERS))
def test_moe_routers_are_float32_and_never_quantized(moe_checkpoints, tmp_path, family, recipe):
    """``convert`` (bf16 output by default, optionally 4-bit) writes router tensors in float32 and
    never quantizes them; everything else floating is bf16. The loader keeps them float32 in a
    bf16 model, whose forward stays bf16; ``fuse`` writes them float32 too."""
    from mlx.utils import tree_flatten

    from mlxllm.loader import load_model
    from mlxllm.lora import fuse
    from mlxllm.lora.layers import apply_lora, save_adapter

    kw = {} if recipe is None else dict(bits=4, group_size=32, recipe=recipe)
    out = convert(moe_checkpoints[family], tmp_path / "out", progress=False, **kw)
    tensors = _tensors(out)
    routers = {k for k in tensors if _is_router_tensor(k)}
    assert set(MOE_ROUTERS[family]) <= routers
    for k in routers:
        assert tensors[k].dtype == mx.float32, k
        assert not k.endswith((".scales", ".biases")), k  # never quantized
    others = {k: v.dtype for k, v in tensors.items() if k not in routers}
    floats = {k: d for k, d in others.items() if mx.issubdtype(d, mx.floating)}
    assert floats and set(floats.values()) == {mx.bfloat16}, floats
    qconfig = json.loads((out / "config.json").read_text()).get("quantization", {})
    if recipe:
        assert any(k.endswith(".scales") for k in tensors)  # the rest is quantized
        assert not any(_is_router_tensor(f"{p}.weight") for p in qconfig if "." in p)

    model = load_model(out, dtype=mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    for k in routers:
        assert params[k].dtype == mx.float32, k
    assert not any(
        _is_router_tensor(f"{p}.weight") and "Quantized" in type(m).__name__
        for p, m in model.named_modules()
    )
    assert {params[k].dtype for k in floats} == {mx.bfloat16}
    # a float32 gate output must not turn the bf16 residual stream float32
    assert model(mx.array([[5, 17, 300, 41, 12, 9, 310, 77]])).dtype == mx.bfloat16

    if recipe is None:
        apply_lora(model, rank=4, targets=("o_proj",))
        save_adapter(model, tmp_path / "adapter")
        fused = _tensors(fuse(out, tmp_path / "adapter", tmp_path / "fused"))  # bf16 output
        assert {k for k in fused if _is_router_tensor(k)} == routers
        assert {fused[k].dtype for k in routers} == {mx.float32}
        assert {fused[k].dtype for k in floats} == {mx.bfloat16}
