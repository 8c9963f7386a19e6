"""Live progress of a local run: one line per running trainer process (bar, step/total, loss,
tokens/s, ETA) under a header with the round, fed by the trainer's progress records (the dicts of
`mot_trainer.progress`, read from each process's MOT_PROGRESS_FILE), never by its log text.

On a terminal a rich `Live` block is redrawn in place, with permanent messages printed above it;
otherwise (CI, pipes) plain lines without escape codes are printed, one per process at most every
`plain_interval` seconds, so logs stay readable."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mot_trainer.progress import duration as _duration


@dataclass
class TaskLine:
    """One running process: its label and latest progress record."""

    label: str
    record: dict | None = None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    done: str | None = None  # final word once the process ended

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    def feed(self, record: dict | None) -> bool:
        """Take a progress record; True when it changes what is shown."""
        if not record or record == self.record:
            return False
        self.record = record
        return True

    @property
    def step(self) -> int | None:
        return (self.record or {}).get("step")

    @property
    def total(self) -> int | None:
        return (self.record or {}).get("totalSteps")

    def fields(self) -> list[str]:
        """The texts after the label and bar: step/total, loss, tokens/s, then ETA or the final word."""
        rec = self.record or {}
        parts = []
        if self.total:
            parts.append(f"step {self.step or 0}/{self.total}")
        else:  # no record (merge, eval, preflight, or an SFT still loading): how long it has run
            parts.append(_duration(self.clock() - self.started))
        if rec.get("loss") is not None:
            parts.append(f"loss {rec['loss']:.4f}")
        if rec.get("tokensPerSecond"):
            parts.append(f"{rec['tokensPerSecond']:.0f} tok/s")
        if self.done:
            parts.append(self.done)
        elif rec.get("etaSeconds") is not None:
            parts.append(f"ETA {_duration(rec['etaSeconds'])}")
        return parts

    def render(self) -> str:
        """The plain-text line (no bar, no escape codes)."""
        return "  ".join([self.label, *self.fields()])

    def row(self) -> list:
        """The live block's row: label, bar, the fields."""
        if self.total:
            bar = ProgressBar(total=self.total, completed=self.step or 0, width=24)
        else:
            bar = ProgressBar(total=None, pulse=True, width=24)
        return [Text(self.label, style="bold"), bar, *(Text(p) for p in self.fields())]


class LiveView:
    """The view the runner drives: set_header, start, feed (a progress record), finish, message,
    redraw, close."""

    def __init__(self, stream=None, tty: bool | None = None, plain_interval: float = 10.0,
                 console: Console | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or (console.file if console else sys.stdout)
        self.tty = (console.is_terminal if console else self.stream.isatty()) if tty is None else tty
        self.plain_interval = plain_interval
        self.clock = clock
        self.console = console or Console(file=self.stream, force_terminal=self.tty, highlight=False,
                                          soft_wrap=False)
        self.header = ""
        self.lines: dict[str, TaskLine] = {}
        self._live: Live | None = None
        self._closed = False
        self._last_plain: dict[str, float] = {}

    def set_header(self, text: str) -> None:
        if text != self.header:
            self.header = text
            if not self.tty:
                self._print(text)

    def start(self, key: str, label: str) -> None:
        self.lines[key] = TaskLine(label, clock=self.clock)
        if not self.tty:
            self._print(f"  started  {label}")

    def feed(self, key: str, record: dict | None) -> None:
        """The process's latest progress record; on a terminal it shows at the next redraw."""
        line = self.lines.get(key)
        if line and line.feed(record) and not self.tty:
            now = self.clock()
            if now - self._last_plain.get(key, float("-inf")) >= self.plain_interval:
                self._last_plain[key] = now
                self._print("  " + line.render())

    def finish(self, key: str, word: str) -> None:
        line = self.lines.pop(key, None)
        self._last_plain.pop(key, None)
        if line is None:
            return
        line.done = word
        self.message(line.render())

    def message(self, text: str) -> None:
        """A permanent line (or block) above the live one."""
        self._print(text)  # on a terminal while live: rich prints it above the block
        if self._live is not None:
            self.redraw()

    def redraw(self) -> None:
        if not self.tty or self._closed:
            return
        if self._live is None:
            # Drawn by redraw() only: no refresh thread touches `lines` while the runner changes them.
            self._live = Live(self._renderable(), console=self.console, auto_refresh=False, transient=True)
            self._live.start()
        self._live.update(self._renderable(), refresh=True)

    def close(self) -> None:
        """Erase the live block (what ended was printed above it); later messages print plainly."""
        self._closed = True
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _renderable(self):
        table = Table.grid(padding=(0, 2))
        for line in self.lines.values():
            table.add_row(*line.row())
        return Group(Text(self.header, style="bold"), table) if self.lines else Text(self.header, style="bold")

    def _print(self, text: str) -> None:
        if self.tty:  # not wrapped by rich (the terminal does): messages stay whole for copying
            self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:  # not through rich: no escape codes, no wrapping of long lines in logs
            self.stream.write(text + "\n")
            self.stream.flush()
