"""Layout: convert/, quant/, cli/ install inside the mlxllm package, never as top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_subpackages_and_no_top_level_cli(tmp_path):
    code = (
        "import mlxllm.cli.main, mlxllm.convert, mlxllm.quant\n"
        "try:\n    import cli\nexcept ImportError:\n    print('no-cli')\n"
        "from mlxllm import load, generate, stream_generate\n"
        "print(callable(load) and callable(generate) and callable(stream_generate))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["no-cli", "True"], out.stdout + out.stderr


def test_wheel_maps_subpackages_under_mlxllm(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("mlxllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sub in (
        "cli/main.py",
        "cli/chat.py",
        "convert/__init__.py",
        "quant/__init__.py",
        "lora/train.py",
    ):
        assert f"mlxllm/{sub}" in names
    assert "mlxllm/registry/aliases.json" in names
    assert not any(n.split("/")[0] in ("cli", "convert", "quant", "tests") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mlxllm = mlxllm.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
