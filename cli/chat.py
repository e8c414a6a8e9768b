"""The interactive chat loop behind ``mlxllm chat``.

One ``PromptCache`` lives for the whole session: each turn renders the full conversation with
the chat template, and only the tokens after the cached prefix are run through the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

HELP = (
    "Commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), "
    '/exit, /help. Multi-line: start and end with """, or end a line with \\. A message that '
    "begins with / starts with //."
)


class ThinkFilter:
    """Split streamed text into (text, is_thinking) pieces around ``<think>...</think>``.

    R1 and QwQ templates open the ``<think>`` block in the prompt, so a reply may start inside it.
    Tags split across chunks are held back until complete.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, bool]]:
        self.buf += text
        out = []
        while self.buf:
            tag = self.CLOSE if self.thinking else self.OPEN
            i = self.buf.find(tag)
            if i >= 0:
                if i:
                    out.append((self.buf[:i], self.thinking))
                out.append((tag, True))
                self.buf = self.buf[i + len(tag) :]
                self.thinking = not self.thinking
                continue
            # keep a tail that could be the start of the tag
            keep = next((n for n in range(len(tag) - 1, 0, -1) if self.buf.endswith(tag[:n])), 0)
            emit = self.buf[: len(self.buf) - keep]
            if emit:
                out.append((emit, self.thinking))
            self.buf = self.buf[len(self.buf) - keep :]
            break
        return out

    def flush(self) -> list[tuple[str, bool]]:
        out = [(self.buf, self.thinking)] if self.buf else []
        self.buf = ""
        return out


def _setup_readline():
    """Line editing and history (arrow keys, Ctrl-R) where the readline module exists."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return None
    hist = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxllm" / "history"
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(hist)
    except OSError:
        return None
    readline.set_history_length(1000)
    return hist


class ChatSession:
    def __init__(self, model, tokenizer, system=None, max_tokens=2048, sampling=None, console=None):
        from mlxllm.cache import PromptCache

        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling or {}
        self.console = console or Console(highlight=False)
        self.cache = PromptCache(model)
        self.messages: list[dict] = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()

    def _opens_thinking(self) -> bool:
        """Does the rendered generation prompt end inside an open <think> block?"""
        try:
            text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        except Exception:
            return False
        tail = text[-200:]
        return tail.rfind("<think>") > tail.rfind("</think>")

    def reply(self, user_text: str):
        """Stream one assistant reply; returns the last stats chunk (None if interrupted early)."""
        from mlxllm.cli.progress import PrefillProgress
        from mlxllm.errors import InvalidArgument
        from mlxllm.generation.stream import stream_generate

        self.messages.append({"role": "user", "content": user_text})
        think = ThinkFilter(self._opens_thinking())
        parts, last = [], None
        progress = PrefillProgress(sys.stderr)
        try:
            for last in stream_generate(
                self.model,
                self.tokenizer,
                self.messages,
                max_tokens=self.max_tokens,
                cache=self.cache,
                progress=progress,
                **self.sampling,
            ):
                progress.close()
                parts.append(last.text)
                self._print(think.feed(last.text))
            self._print(think.flush())
        except InvalidArgument as e:  # e.g. the conversation outgrew the context: say so, go on
            progress.close()
            self.messages.pop()
            self.console.print(f"[red]error:[/] {e} (/reset starts over)")
            return None
        except KeyboardInterrupt:
            progress.close()
            self._print(think.flush())
            self.console.print("\n[yellow](reply interrupted)[/]")
        self.console.print()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        return last

    def _print(self, pieces):
        for text, dim in pieces:
            self.console.print(Text(text, style="dim" if dim else ""), end="", soft_wrap=True)

    def _read(self) -> str | None:
        """One user message (None at end of input)."""
        prompt = ">>> "
        lines: list[str] = []
        in_block = False
        while True:
            try:
                line = input(prompt)
            except EOFError:
                return None if not lines else "\n".join(lines)
            if not in_block and not lines and line.strip().startswith('"""'):
                line = line.strip()[3:]
                if line.endswith('"""'):
                    return line[:-3]
                in_block = True
                lines.append(line)
                prompt = "... "
                continue
            if in_block:
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
                continue
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "... "
                continue
            lines.append(line)
            return "\n".join(lines)

    def repl(self):
        hist = _setup_readline() if sys.stdin.isatty() else None
        self.console.print(f"[dim]{HELP}[/]")
        while True:
            try:
                text = self._read()
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /exit to quit)[/]")
                continue
            if text is None:
                break
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/reset":
                self.reset()
                self.console.print("[dim](conversation cleared)[/]")
                continue
            if cmd.startswith("/system"):
                self.system = cmd[len("/system") :].strip() or None
                self.reset()
                self.console.print(f"[dim](system prompt {'set' if self.system else 'cleared'})[/]")
                continue
            if cmd in ("/help", "/?"):
                self.console.print(f"[dim]{HELP}[/]")
                continue
            if cmd.startswith("/") and not cmd.startswith("//"):
                # a typo'd command must not reach the model as a message
                self.console.print(
                    f"[yellow]unknown command {cmd.split()[0]}[/] [dim](/help lists them; "
                    "start with // to send a message that begins with /)[/]"
                )
                continue
            if cmd.startswith("//"):
                text = text.replace("//", "/", 1)
            last = self.reply(text)
            if last is not None:
                self.console.print(
                    f"[dim]{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s "
                    f"(prompt {last.prompt_tokens} new tokens, {last.prompt_tps:.1f} tok/s)[/]"
                )
        if hist is not None:
            import readline

            try:
                readline.write_history_file(hist)
            except OSError:
                pass
