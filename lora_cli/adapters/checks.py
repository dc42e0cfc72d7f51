"""The value checks every adapter config's ``problems()`` is built from, and the bounds they hold.

Each returns a list of :class:`~lora_cli.errors.Problem` (empty when the value is fine), so a
config reports every problem at once. Imports no torch (recipes are checked without it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_cli.errors import Problem

if TYPE_CHECKING:
    from lora_cli.adapters.config import AdapterConfig


def check_rate(name: str, value: Any) -> list[Problem]:
    """Probabilities such as dropout: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return [Problem(name, "must be a number in [0, 1)", value, hint="e.g. 0.05; 0 disables it")]
    return []


MAX_RANK = 65536
"""The largest rank a config takes (``r``, AdaLoRA's ``init_r`` / ``target_r``, ``rank_pattern`` values):
above the widest layer of today's models. When the adapter is added, each layer also refuses a rank
larger than itself (:func:`lora_cli.adapters.layers.rank_refusal`)."""
MAX_WIDTH = 65536
"""The largest width or token count a config takes (virtual tokens, encoder and head widths)."""
MAX_DEPTH = 1024
"""The largest number of layers a config's own encoder or head may stack."""
_SIZE_HINTS = {
    MAX_RANK: "ranks are usually 4 to 256, and a rank above the adapted layer's own size adds nothing",
    MAX_DEPTH: "a few layers are usual",
}


def check_positive_int(name: str, value: Any, allow_zero: bool = False, maximum: int | None = None) -> list[Problem]:
    """An integer >= 1 (>= 0 with ``allow_zero``) and, for sizes that allocate, at most ``maximum``
    (:data:`MAX_RANK`, :data:`MAX_WIDTH`, :data:`MAX_DEPTH`): a bound checked before anything is made."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return [Problem(name, f"must be an integer >= {low}", value)]
    if maximum is not None and value > maximum:
        hint = _SIZE_HINTS.get(maximum, "no model is that wide")
        return [Problem(name, f"must be an integer between {low} and {maximum}", value, hint=hint)]
    return []


def check_number(name: str, value: Any) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [Problem(name, "must be a number", value)]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return [Problem(name, "must be a finite number", value, hint="NaN or infinity scales every update to NaN")]
    return []


def check_choice(name: str, value: Any, choices: tuple) -> list[Problem]:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        return [Problem(name, f"must be one of {shown}", value)]
    return []


def check_patterns(config: AdapterConfig) -> list[Problem]:
    """rank_pattern values must be ranks; alpha_pattern values numbers."""
    out: list[Problem] = []
    if isinstance(config.rank_pattern, dict):
        for key, value in config.rank_pattern.items():
            if isinstance(value, list):  # AdaLoRA masks are lists of booleans
                continue
            out += check_positive_int(f"rank_pattern[{key!r}]", value, maximum=MAX_RANK)
    if isinstance(config.alpha_pattern, dict):
        for key, value in config.alpha_pattern.items():
            out += check_number(f"alpha_pattern[{key!r}]", value)
    return out


def check_init_settings(
    field: str, value: Any, *, init: Any, wanted: str, known: Any, label: str, example: str, required: bool = False
) -> tuple[list[Problem], dict[str, Any]]:
    """What every start's settings mapping (``eva_config``, ``corda_config``, ``loftq_config``,
    ``lora_ga_config``) shares: it is given only with its ``init_lora_weights``, it is a
    mapping, its keys are known. Returns the problems and the known entries, whose values the
    caller then checks (so every problem is reported at once)."""
    keys = ", ".join(known)
    if init != wanted:
        if value:
            shown = "{...}" if isinstance(value, dict) else value
            hint = f"remove {field}, or set init_lora_weights: {wanted} (it is {init!r})"
            return [Problem(field, f"is only used with init_lora_weights: {wanted}", shown, hint=hint)], {}
        return [], {}
    if value is None or (required and value == {}):
        problem = Problem(field, f"is required with init_lora_weights: {wanted}", value, hint=f"e.g. {example}")
        return ([problem] if required else []), {}
    if not isinstance(value, dict):
        return [Problem(field, f"must be a mapping of {label} settings", value, hint=f"e.g. {example}; keys: {keys}")], {}
    problems = [
        Problem(f"{field}.{key}", f"is not among the {label} settings", item, hint=f"{label} settings are: {keys}")
        for key, item in value.items()
        if key not in known
    ]
    return problems, {key: item for key, item in value.items() if key in known}
