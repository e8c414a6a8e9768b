"""Model aliases (``qwen2.5-7b`` -> ``Qwen/Qwen2.5-7B-Instruct``), kept in ``aliases.json``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def aliases() -> dict[str, str]:
    data = json.loads((Path(__file__).parent / "aliases.json").read_text())
    return data["aliases"]


def resolve_alias(name: str) -> str | None:
    """Hub repo id for an alias (case-insensitive), or None."""
    return aliases().get(name.lower())
