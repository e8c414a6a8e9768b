"""Output folders that never cost the user anything they own.

What ``convert`` and ``fuse`` write goes into a hidden sibling of OUT (``.NAME.partial-PID``) that
is renamed to OUT only when complete, and carries a marker (``.mlxllm-output.json``) listing the
files written. An existing OUT is replaced only with ``force``, and even then only when it is
empty or recognisably an earlier output of ours (the marker is there and nothing else was added
since). An OUT that is, contains or lies inside the source, or that is or contains the current
folder, is always refused. Partial folders left by killed runs are removed by the next run on the
same OUT once their process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mlxllm.errors import MlxllmError

MARKER = ".mlxllm-output.json"


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def ours(folder: Path) -> bool:
    """Is ``folder`` an earlier output of ours, with nothing foreign added since?"""
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    present = {p.name for p in folder.iterdir()} - {MARKER}
    return present <= listed


def check_output(
    out, force: bool, sources: Iterable[os.PathLike] = (), flag: str = "--out"
) -> Path:
    """Validate an output folder before any work starts; returns it (``~`` expanded).

    Args:
        out: the output folder.
        force: an existing ``out`` may be replaced (only if empty or an earlier output of ours).
        sources: folders the run reads (the model, an adapter): ``out`` may not overlap them.
        flag: the option's name, for messages.
    """
    out = Path(out).expanduser()
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, target):
        what = "the current folder" if target == cwd else f"a parent of the current folder ({cwd})"
        raise MlxllmError(f"{flag} {out} is {what}; write to a new folder, e.g. {flag} ./out")
    for src in sources:
        src = Path(src).expanduser().resolve()
        if _within(target, src) or _within(src, target):
            raise MlxllmError(
                f"{flag} {out} overlaps the source {src}; write the output to another folder"
            )
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise MlxllmError(f"{flag} {out} is a file, not a folder; choose another path")
        if not force:
            raise MlxllmError(f"{out} already exists; pass --force to replace it")
        if any(target.iterdir()) and not ours(target):
            raise MlxllmError(
                f"{out} holds files mlxllm did not write, so --force will not replace it; "
                "remove them yourself or choose another folder"
            )
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or unknown: leave its folder alone
    return True


def remove_stale(out: Path) -> list[Path]:
    """Delete the partial (and replaced) folders of earlier runs on ``out`` whose process is
    gone; returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def staged_output(out: Path, kind: str):
    """Yield a temporary sibling of ``out`` to write into.

    On success the marker is written and the folder takes ``out``'s place (an existing ``out``,
    already checked by ``check_output``, is removed only then); on any failure, Ctrl-C included,
    it is deleted, so a half-written model never appears under ``out``.
    """
    out = Path(out).expanduser()
    remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"tool": "mlxllm", "kind": kind, "files": files}))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
