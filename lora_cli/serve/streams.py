"""One row of a generation batch: its tokens, when it stops, and the text it may stream.

A batch of prompts is generated together (:mod:`lora_cli.serve.backend`), but each row stops
on its own: at an end-of-sequence token, at one of its ``stop`` strings, after its own
``max_tokens``, or when its client goes away. :class:`Row` takes the row's tokens one at a
time and hands out text in pieces (``emit``) such that the pieces always add up to the final
answer:

- text that could still turn into a stop string is held back until it cannot
  (``stop=["\\n\\n"]`` holds a trailing ``"\\n"``), so a stop string is never streamed;
- a trailing U+FFFD (half of a multi-byte character split across tokens) is held back
  until the next token completes it.

Pure Python: the tokenizer comes in as a ``decode(ids) -> str`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

STOP = "stop"
LENGTH = "length"
CANCELLED = "cancelled"
"""Finish reasons: OpenAI's ``stop`` and ``length``; ``cancelled`` when the client left."""


@dataclass(eq=False)
class Row:
    """A prompt being continued; ``push`` each new token, read ``text`` / ``finish_reason`` at the end."""

    prompt_ids: list[int]
    max_tokens: int
    decode: Callable[[list[int]], str]
    emit: Callable[[str, str | None], None] = lambda text, finish: None
    """Called with each new piece of text (and the finish reason on the last call, else None)."""
    stop: list[str] = field(default_factory=list)
    eos_ids: frozenset[int] = frozenset()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    """The text handed out so far (the whole answer once finished)."""
    finish_reason: str | None = None
    cancelled: bool = False
    """Set from another thread when the client goes away: the row finishes at its next token."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def push(self, token: int) -> bool:
        """Take the next generated token; True once the row has finished."""
        if self.finished:
            return True
        if self.cancelled:
            self._finish(CANCELLED, self.text)
        elif token in self.eos_ids:
            self._finish(STOP, self._full())
        else:
            self.ids.append(token)
            full = self._full()
            cut = self._stop_at(full)
            if cut is not None:
                self._finish(STOP, full[:cut])
            elif len(self.ids) >= self.max_tokens:
                self._finish(LENGTH, full)
            else:
                self._hand_out(full[: len(full) - self._held_back(full)], None)
        return self.finished

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        """Finish a row the model stopped feeding (its token budget ran out with the batch's)."""
        if not self.finished:
            self._finish(CANCELLED if self.cancelled else LENGTH, self._full())

    def _full(self) -> str:
        return self.decode(self.ids)

    def _stop_at(self, full: str) -> int | None:
        """Where the first stop string starts in ``full`` (None: nowhere)."""
        if not self.stop:
            return None
        start = max(0, len(self.text) - max(len(s) for s in self.stop))  # earlier text was checked already
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """How many trailing characters of ``full`` must wait: an unfinished character, or the start of a stop string."""
        held = len(full) - len(full.rstrip("\ufffd"))
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return held

    def _finish(self, reason: str, final: str) -> None:
        self.finish_reason = reason
        self._hand_out(final, reason)

    def _hand_out(self, upto: str, finish: str | None) -> None:
        # a tokenizer whose decode of more tokens rewrites earlier characters: hand out nothing
        # new until it agrees with what was sent (the pieces must add up to the answer)
        piece = upto[len(self.text):] if upto.startswith(self.text) and len(upto) > len(self.text) else ""
        if piece:
            self.text = upto
        if piece or finish is not None:
            self.emit(piece, finish)
