"""Live progress of a local run: one line per running trainer process (step, loss, ETA) under a
header with the round. On a terminal the block is redrawn in place; otherwise plain lines are
printed, throttled, so logs stay readable in CI."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

# The trainer logs lines like "step 12/50 loss 0.5321 lr 1.0e-03 tok/s 9876 eta 4s"; be lenient
# about separators so a change of punctuation there does not blank the display.
_STEP = re.compile(r"\bstep[\s:=]+(\d+)\s*/\s*(\d+)", re.I)
_LOSS = re.compile(r"\bloss[\s:=]+([0-9.]+(?:e[-+]?\d+)?)", re.I)
_ETA = re.compile(r"\beta[\s:=]+(\S+)", re.I)


@dataclass
class TaskLine:
    label: str
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    eta: str | None = None
    started: float = field(default_factory=time.monotonic)
    done: str | None = None  # final word once the process ended

    def feed(self, text: str) -> bool:
        """Parse trainer log text; True when something shown changed."""
        changed = False
        for line in text.splitlines():
            if m := _STEP.search(line):
                self.step, self.total = int(m.group(1)), int(m.group(2))
                changed = True
            if m := _LOSS.search(line):
                self.loss = float(m.group(1))
                changed = True
            if m := _ETA.search(line):
                self.eta = m.group(1).strip()
                changed = True
        return changed

    def render(self, width: int = 30) -> str:
        parts = [self.label.ljust(width)]
        if self.total:
            filled = int(20 * (self.step or 0) / self.total)
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] step {self.step}/{self.total}")
        else:
            parts.append(f"{time.monotonic() - self.started:5.0f}s")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.done:
            parts.append(self.done)
        elif self.eta:
            parts.append(f"ETA {self.eta}")
        return "  ".join(parts)


class Progress:
    def __init__(self, stream=None, tty: bool | None = None, plain_interval: float = 10.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_interval = plain_interval
        self.header = ""
        self.lines: dict[str, TaskLine] = {}
        self._drawn = 0
        self._last_plain: dict[str, float] = {}

    def set_header(self, text: str) -> None:
        if text != self.header:
            self.header = text
            if not self.tty:
                self._print(text)

    def start(self, key: str, label: str) -> None:
        self.lines[key] = TaskLine(label)
        if not self.tty:
            self._print(f"  started  {label}")

    def feed(self, key: str, text: str) -> None:
        line = self.lines.get(key)
        if line and line.feed(text) and not self.tty:
            now = time.monotonic()
            if now - self._last_plain.get(key, 0.0) >= self.plain_interval:
                self._last_plain[key] = now
                self._print("  " + line.render())

    def finish(self, key: str, word: str) -> None:
        line = self.lines.pop(key, None)
        if line is None:
            return
        line.done = word
        self.message(line.render())

    def message(self, text: str) -> None:
        """A permanent line above the live block."""
        self._clear()
        self._print(text)
        self.redraw()

    def redraw(self) -> None:
        if not self.tty:
            return
        self._clear()
        block = [self.header] + ["  " + line.render() for line in self.lines.values()]
        self.stream.write("\n".join(block) + "\n")
        self.stream.flush()
        self._drawn = len(block)

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\x1b[F\x1b[2K" * self._drawn)
            self._drawn = 0

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
