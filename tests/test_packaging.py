"""Layout: convert/, quant/, cli/ install inside the mlxllm package, never as top-level names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import SMOL, fixture_model

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


def _source_modules() -> list[str]:
    """Every module of the source tree by the name it installs under."""
    roots = {"mlxllm": "mlxllm", "convert": "mlxllm.convert", "quant": "mlxllm.quant"}
    roots["cli"] = "mlxllm.cli"
    names = []
    for folder, package in roots.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout's files (a build inside it would leave
    build/ behind, whose stale files setuptools puts into later wheels)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp / "src" / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(tmp / "dist"), str(tmp / "src")], check=True)
    (path,) = (tmp / "dist").glob("mlxllm-*.whl")
    return path


def test_wheel_maps_subpackages_under_mlxllm(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in _source_modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert "mlxllm/kernels/moe_decode.py" in names  # once left out by a hand-written list
    assert "mlxllm/registry/aliases.json" in names
    assert not any(
        n.split("/")[0] in ("cli", "convert", "quant", "tests", "setup.py") for n in names
    )
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mlxllm = mlxllm.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_wheel_installed_outside_the_checkout_runs_a_model(wheel, tmp_path):
    """What a user gets from ``pip install mlxllm``: a fresh virtualenv outside the checkout with
    the wheel installed (its dependencies are this environment's, reached through a .pth file,
    so nothing is downloaded); every module imports from the installed copy and ``mlxllm
    generate`` runs the SmolLM2 fixture."""
    import sysconfig
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bindir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bindir / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # a path line (not an import line): this environment's packages without running its .pth
    # files, so its editable mlxllm stays out of sight
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    check = (
        "import importlib, sys\n"
        f"names = {_source_modules()!r}\n"
        "for n in names:\n"
        "    m = importlib.import_module(n)\n"
        f"    assert m.__file__.startswith({str(env_dir)!r}), (n, m.__file__)\n"
        "print(len(names))\n"
    )
    out = subprocess.run(
        [str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(_source_modules())

    cmd = [str(bindir / "mlxllm"), "generate", str(fixture_model(SMOL)), "-p", "Hi"]
    cmd += ["--max-tokens", "8", "--no-chat-template"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip(), "no text generated"
