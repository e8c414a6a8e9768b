"""Progress of prompt processing for ``generate`` and ``chat``."""

from __future__ import annotations

import sys


class PrefillProgress:
    """``progress(done, total, seconds)`` for ``stream_generate``: once prompt processing has
    taken ``after`` seconds, shows ``prompt: done/total tokens, N tok/s`` on ``stream`` (stderr):
    one line rewritten in place on a terminal, a new line every ``every`` seconds otherwise.
    ``close()`` (at the first generated text) clears the terminal line."""

    def __init__(self, stream=None, after: float = 1.0, every: float = 5.0):
        self.stream = stream or sys.stderr
        self.after, self.every = after, every
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown, self.last = False, -every

    def __call__(self, done: int, total: int, seconds: float) -> None:
        if seconds < self.after:
            return
        text = f"prompt: {done}/{total} tokens, {done / seconds:.0f} tok/s"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
        elif seconds - self.last >= self.every or done == total:
            self.stream.write(text + "\n")
            self.last = seconds
        else:
            return
        self.shown = True
        self.stream.flush()

    def close(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown = False
