"""User-facing errors: one clear line that names the problem and the fix.

The CLI prints ``str(err)`` for these and exits non-zero; anything else is a bug and shows a
traceback.
"""


class MlxllmError(Exception):
    """An error caused by input or environment, with a message fit for a user."""
