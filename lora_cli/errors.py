"""Exception types shared by the library and the CLI.

Only ``cli.py`` turns these into exit codes: :class:`UserInputError` (bad recipe, path or
argument) is exit code 2, any other :class:`LoraCliError` (a failure during the work) is 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class LoraCliError(Exception):
    """A failure while doing the work (NaN loss, a merge that does not verify, ...)."""

    exit_code = 1


class UserInputError(LoraCliError):
    """The user gave us something we cannot use. Exit code 2, no traceback."""

    exit_code = 2


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``, after the run directory was set up; its message is the one line
    to print: the step, the checkpoint kept, the command that resumes. A KeyboardInterrupt, not
    a LoraCliError, so code that goes on after a failed run (a tune trial) stops with it. Exit 130."""

    exit_code = 130


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where, what was given, what to do."""

    key: str
    message: str
    value: Any = None
    hint: str | None = None

    def render(self) -> str:
        text = f"{self.key}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class ProblemsError(UserInputError, ValueError):
    """Several problems found at once; each one names its key and the fix."""

    def __init__(self, problems: list[Problem], header: str = "invalid configuration"):
        self.problems = list(problems)
        self.header = header
        lines = [f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p.render()}" for p in self.problems]
        super().__init__("\n".join(lines))


class AdapterConfigError(ProblemsError):
    """An adapter config field has a value the method cannot use."""

    def __init__(self, problems: list[Problem], method: str = "adapter"):
        super().__init__(problems, header=f"invalid {method} config")


class TargetingError(UserInputError, ValueError):
    """target_modules / modules_to_save did not resolve to usable modules."""


class NonFiniteError(LoraCliError, ValueError):
    """A computation on finite inputs produced NaN or inf values (an overflow); nothing is written."""


class AdapterStateError(LoraCliError, ValueError):
    """An adapter file does not fit the model (missing, unexpected or mis-shaped tensors)."""


def close_matches(word: object, choices: Iterable[object], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` spelled like ``word``, closest first: the one "did you mean" rule."""
    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(word: object, choices: Iterable[object], prefix: str = "") -> str | None:
    """``did you mean 'x'?`` for the closest choice, or None when nothing is close."""
    close = close_matches(word, choices)
    return f"did you mean {prefix}{close[0]}?" if close else None
