"""Recipe problems that know where they came from: file and line, or the override."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_cli.errors import Problem, ProblemsError


@dataclass(frozen=True)
class Location:
    """Where a recipe value was written: ``file:line`` or a command-line override."""

    file: str | None = None
    line: int | None = None
    override: str | None = None

    def render(self) -> str:
        if self.override is not None:
            return f"override {short(self.override, 100)}"
        if self.line is None:
            return str(self.file)
        return f"{self.file}:{self.line}"


def short(value: object, limit: int = 60) -> str:
    """A value as the user wrote it, cut to one readable line."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class RecipeProblem(Problem):
    """A :class:`Problem` that also names the file and line (or override) it comes from."""

    where: Location = Location()
    has_value: bool = True

    def render(self) -> str:
        parts = [self.where.render()]
        if self.key:
            parts.append(self.key)
        text = ": ".join(parts) + f": {self.message}"
        extra = []
        if self.has_value:
            extra.append(f"got {short(self.value)}")
        if self.hint:
            extra.append(self.hint)
        if extra:
            text += f" ({'; '.join(extra)})"
        return text


class RecipeError(ProblemsError):
    """Everything wrong with a recipe, reported at once (a UserInputError: exit code 2)."""

    def __init__(self, problems: list[RecipeProblem], source: str | None = None):
        self.source = source
        header = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(problems, header=header)


NO_VALUE = object()

YAML11_BOOL_WORDS = frozenset({"yes", "no", "on", "off", "y", "n"})
"""Words YAML 1.1 reads as booleans; recipes are read as YAML 1.2, where they are strings."""

BOOL_WORD_HINT = "recipes are read as YAML 1.2, where yes/no/on/off are text: use true/false"


def is_bool_word(value: object) -> bool:
    """Is ``value`` a string that YAML 1.1 would have read as a boolean (``yes``, ``Off``, ...)?"""
    return isinstance(value, str) and value.strip().lower() in YAML11_BOOL_WORDS


class Reporter:
    """Collects problems for one recipe, placing each at the line its key came from."""

    def __init__(self, locations: dict[tuple, Location], source: str):
        self.locations = locations
        self.source = source
        self.problems: list[RecipeProblem] = []
        self.settled: set[str] = set()
        """Keys already reported as finally wrong (a NaN, say): later problems on them are noise."""

    def locate(self, path: tuple) -> Location:
        """The location of ``path``, or of its nearest written parent."""
        path = tuple(path)
        while path not in self.locations and path:
            path = path[:-1]
        return self.locations.get(path, Location(self.source, 1))

    def add(self, path: tuple, message: str, value: object = NO_VALUE, hint: str | None = None) -> None:
        key = ".".join(str(p) for p in path)
        if self._repeats_settled(key, value):
            return
        has_value = value is not NO_VALUE
        if hint is None and has_value and "true or false" in message and is_bool_word(value):
            hint = BOOL_WORD_HINT
        self.problems.append(
            RecipeProblem(
                key, message, value if has_value else None, hint, where=self.locate(path), has_value=has_value
            )
        )

    def _repeats_settled(self, key: str, value: object) -> bool:
        """A problem on a settled key, or on its parent about the same NaN (``alpha_pattern``)."""
        if key in self.settled:
            return True
        return (
            isinstance(value, float) and not math.isfinite(value)
            and any(s.startswith(key + ".") for s in self.settled)
        )

    def settle(self, path: tuple, message: str, value: object = NO_VALUE, hint: str | None = None) -> None:
        """Report a problem with ``path`` and suppress any later one on the same key."""
        self.add(path, message, value, hint)
        self.settled.add(".".join(str(p) for p in path))

    def raise_if_any(self) -> None:
        if self.problems:
            ordered = sorted(
                self.problems,
                key=lambda p: (p.where.override is not None, p.where.file != self.source, p.where.line or 0),
            )
            raise RecipeError(ordered, source=self.source)
