"""Regular expressions the user writes (``target_modules`` / ``exclude_modules`` as a string, the keys
of ``rank_pattern`` / ``alpha_pattern``), matched against module paths with a time bound.

Python's ``re`` backtracks: a pattern such as ``(a+)+$`` or ``(.|.)*z`` takes time exponential in
the length of the name it fails on, so one recipe line could hang a run for hours. Matching here uses
the ``regex`` package, whose engine finishes such patterns in linear time and takes a timeout, and
two guards remain for the patterns that defeat it too (a repetition with a back-reference, such
as ``(?:(a+)(?=\1))+b``):

- :func:`problem`, run when a config is built (so a recipe reports it at its line, before any model
  loads): the pattern must compile (with ``re``, as PEFT reads it, and with the ``regex`` package,
  which matches it here), be at most :data:`MAX_PATTERN_CHARS` long, and fail or match each of a
  set of probe names within :data:`PROBE_TIMEOUT_S`. The probes are module paths of common models
  and, for each character the pattern names, a run of it ended by a character that breaks the run:
  the inputs on which nested or overlapping repetitions blow up.
- :func:`fullmatch`, used for every match against a model: the ``regex`` package's ``timeout``
  stops a match after :data:`MATCH_TIMEOUT_S` and the pattern is refused naming the module.

Matching semantics are ``re``'s (the ``regex`` package's default ``VERSION0`` is compatible).
"""

from __future__ import annotations

import functools
import re

import regex

from lora_cli.errors import TargetingError

MAX_PATTERN_CHARS = 2000
MATCH_TIMEOUT_S = 1.0
"""Longest a single match against a module path may take before the pattern is refused."""
PROBE_TIMEOUT_S = 0.25
"""Per probe name when the config is checked (ordinary patterns take microseconds)."""
RUN_LENGTH = 40
"""Length of the one-character runs probed: 2**40 steps is beyond any time bound."""

PROBE_NAMES = (
    "model.layers.31.self_attn.q_proj",
    "model.decoder.layers.11.self_attn.v_proj",
    "vit.encoder.layer.0.attention.attention.query",
    "transformer.h.0.attn.c_attn",
    "encoder.block.5.layer.0.SelfAttention.q",
    "base_model.model.model.layers.27.mlp.down_proj.base_layer",
)
_BACKTRACKS = (
    "backtracks catastrophically (its repetitions can split one name in exponentially many ways), so matching "
    "it against module names could take hours"
)
_FIX = "simplify it (e.g. .*\\.(q_proj|v_proj)) or list the module names instead"


class RegexTimeoutError(TargetingError):
    """A user regex took longer than the bound to match one module path."""


def problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used as a module regex (with the fix), or None when it can."""
    return _problem(pattern) if isinstance(pattern, str) else "must be a string"


@functools.lru_cache(maxsize=256)
def _problem(pattern: str) -> str | None:
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long; a module regex takes at most {MAX_PATTERN_CHARS}"
    try:
        re.compile(pattern)
        compiled = regex.compile(pattern)
    except (re.error, regex.error) as exc:
        return f"is not a valid regular expression ({exc})"
    except (OverflowError, RecursionError, MemoryError):
        return "is not a usable regular expression (too deeply nested or too large)"
    for name in _probes(pattern):
        try:
            compiled.fullmatch(name, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            return f"{_BACKTRACKS}; {_FIX}"
    return None


def _probes(pattern: str) -> list[str]:
    chars = sorted({c for c in pattern if c.isalnum() or c in "._"} | set("a0._"))
    runs = []
    for c in chars:
        for end in ("!", "." if c != "." else "a"):
            runs.append(c * RUN_LENGTH + end)
    return [*PROBE_NAMES, *runs]


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch(pattern, name)`` with a time bound: a :class:`RegexTimeoutError` naming the
    pattern and the module when one match takes longer than :data:`MATCH_TIMEOUT_S`."""
    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RegexTimeoutError(
            f"the regex {pattern!r} took more than {MATCH_TIMEOUT_S:g} s to match the module name {name!r}: it "
            f"{_BACKTRACKS}; {_FIX}"
        ) from None
