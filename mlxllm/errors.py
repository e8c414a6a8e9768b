"""User-facing errors: one clear line that names the problem and the fix.

The CLI prints ``str(err)`` for these and exits non-zero; anything else is a bug and shows a
traceback. Python callers catch the same types and read the same messages.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path


class MlxllmError(Exception):
    """An error caused by input or environment, with a message fit for a user."""


class InvalidArgument(MlxllmError, ValueError):
    """A setting outside what it can be (a flag value, a prompt); also a ``ValueError``."""


def os_error_line(e: OSError) -> str:
    """One line for an error of the operating system (a full disk, a permission)."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk{where}; free some space or write to another disk"
    if e.errno == errno.EFBIG:
        return f"file too large for this file system or limit{where}; write to another disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the folder's permissions or use another one"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; write to another folder"
    return f"{e.strerror or e}{where}"


def read_json_object(path: Path, what: str = "JSON file") -> dict:
    """A JSON file a user may have broken that must hold an object (a config, a tokenizer
    config, a weight index): its contents, or one line naming the file and the fix."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxllmError(f"{path} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise MlxllmError(
            f"{path} holds a JSON {type(data).__name__}, not the object a {what} is; "
            "fix or re-download it"
        )
    return data
