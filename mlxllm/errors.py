"""User-facing errors: one clear line that names the problem and the fix.

The CLI prints ``str(err)`` for these and exits non-zero; anything else is a bug and shows a
traceback. Python callers catch the same types and read the same messages.
"""

from __future__ import annotations

import errno


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
