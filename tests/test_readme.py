"""The README's Python code runs as written (on a fixture: the Hub is unreachable here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import SMOL, fixture_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python block"
    for code in blocks:
        # the one substitution: the README's alias becomes the local fixture checkpoint
        aliases = re.findall(r'load\("([^"]+)"', code)
        for alias in aliases:
            code = code.replace(f'"{alias}"', repr(str(fixture_model(SMOL))))
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip(), "the block printed nothing"
