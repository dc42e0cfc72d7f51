"""Progress on stderr, one display per phase of the work that takes real time (decoding
images, tokenizing, training), readable in a terminal of any width and in a log file.

On a terminal a phase is one live line that redraws in place. Anywhere else (a pipe, a log,
CI) nothing is redrawn: a phase prints a line when it starts, a line at most every
``every`` seconds while it runs, and a line when it ends, so a log holds a few readable
lines instead of carriage-return frames (and no bar). Every line fits the console's width:
the fields of least use are dropped first (:func:`fit`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

BAR = "━"


@dataclass(frozen=True)
class Field:
    """One piece of a progress line. ``keep``: lower is kept longer when the line must be cut."""

    text: str
    keep: int
    bar: float | None = None
    """A bar field (``text`` unused): the fraction done; it takes the width the others leave."""


BAR_MIN, BAR_MAX = 8, 24


def fit(fields: Sequence[Field], width: int) -> Text:
    """The fields, in their order, that fit in ``width`` columns: the least kept ones dropped
    until the rest fit (a bar needs :data:`BAR_MIN` columns and grows into what is left)."""
    kept = [f for f in fields if f.text or f.bar is not None]

    def length(items: Sequence[Field]) -> int:
        return sum(BAR_MIN if f.bar is not None else len(f.text) for f in items) + max(len(items) - 1, 0)

    while kept and length(kept) > width:
        kept.remove(max(kept, key=lambda f: (f.keep, kept.index(f))))
    spare = width - length(kept)
    line = Text(no_wrap=True, overflow="crop")
    for i, field in enumerate(kept):
        if i:
            line.append(" ")
        if field.bar is None:
            line.append(field.text)
        else:
            size = min(BAR_MIN + spare, BAR_MAX)
            done = round(size * min(max(field.bar, 0.0), 1.0))
            line.append(BAR * done, style="bar.complete")
            line.append(BAR * (size - done), style="bar.back")
    return line


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Line:
    """A renderable that builds its line at the width it is drawn at (the terminal may be resized)."""

    def __init__(self, fields: Callable[[], Sequence[Field]]) -> None:
        self.fields = fields

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield fit(self.fields(), options.max_width)


class LiveLine:
    """One progress line: redrawn in place on a terminal; elsewhere printed by :meth:`note`
    (at most every ``every`` seconds unless forced) and once by :meth:`close`."""

    def __init__(self, fields: Callable[[], Sequence[Field]], console: Console | None = None,
                 every: float = 30.0) -> None:
        self.console = console or Console(stderr=True)
        self.fields = fields
        self.every = every
        self.live: Live | None = None
        self.last_note = 0.0
        self.closed = False
        self.printed = ""

    @property
    def redraws(self) -> bool:
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def open(self, first: str | None = None) -> None:
        """Start showing; off a terminal ``first`` (or the line itself) is printed once."""
        if self.redraws:
            self.live = Live(_Line(self.fields), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        else:
            self._print(first)
        self.last_note = time.monotonic()

    def note(self, force: bool = False) -> None:
        """Off a terminal: print the line now if ``force`` or ``every`` seconds have passed."""
        if self.live is not None or self.closed:
            return
        if force or time.monotonic() - self.last_note >= self.every:
            self._print()
            self.last_note = time.monotonic()

    def close(self, last: str | None = None) -> None:
        """Stop: the terminal keeps the final line; off a terminal ``last`` (or the line) is printed."""
        if self.closed:
            return
        self.closed = True
        if self.live is not None:
            self.live.stop()
            self.live = None
        else:
            self._print(last)

    def _print(self, text: str | None = None) -> None:
        """One line of the log: no bar (its width would shift the columns from line to line), and
        not the same line twice in a row (an evaluation at the last step, then the end)."""
        fields = [Field(text, 0)] if text is not None else [f for f in self.fields() if f.bar is None]
        line = fit(fields, self.console.width)
        if line.plain != self.printed:
            self.console.print(line, highlight=False, soft_wrap=False)
            self.printed = line.plain


class Phase:
    """A phase of the data preparation (decoding images, tokenizing), counted as it goes:

        with Phase("decoding images", total=len(ds), unit="images"):
            ds.map(counted(fn, batched=True), ...)

    It shows itself at the first row counted, so a phase datasets serves from its cache shows
    nothing. :func:`counted` advances the phase that is open, so the mapped function captures
    nothing new and datasets' fingerprint of it (its cache key) does not depend on the display.
    Rows counted in other processes (``num_proc`` > 1) are not seen here."""

    active: Phase | None = None

    def __init__(self, label: str, total: int, unit: str, console: Console | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.start = 0.0
        self.pid = os.getpid()
        self.line = LiveLine(self._fields, console)
        self.shown = False

    def _fields(self) -> list[Field]:
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        return [
            Field(self.label, 0),
            Field("", 5, bar=self.done / self.total if self.total else 1.0),
            Field(f"{self.done:,d}/{self.total:,d}", 1),
            Field(clock(elapsed), 3),
            Field(f"eta {clock(left)}" if left is not None and self.done < self.total else "", 2),
        ]

    def __enter__(self) -> Phase:
        self.start = time.monotonic()
        Phase.active = self
        return self

    def advance(self, n: int = 1) -> None:
        if os.getpid() != self.pid:
            return
        if not self.shown:
            self.shown = True
            self.line.open(f"{self.label}: {self.total:,d} {self.unit} ...")
        self.done += n
        self.line.note()

    def __exit__(self, kind, exc, tb) -> None:
        Phase.active = None
        if self.shown:
            seconds = time.monotonic() - self.start
            outcome = "stopped after" if kind is not None else "done,"
            self.line.close(f"{self.label}: {outcome} {self.done:,d} of {self.total:,d} {self.unit} in {seconds:.1f} s")


def counted(fn: Callable[..., Any], batched: bool = False) -> Callable[..., Any]:
    """``fn`` that advances the open :class:`Phase` by the rows it was given (one, or a batch's)."""

    def wrapper(first, *args, **kwargs):
        out = fn(first, *args, **kwargs)
        phase = Phase.active
        if phase is not None:
            phase.advance(len(first) if batched else 1)
        return out

    return wrapper
