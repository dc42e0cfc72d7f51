"""One table of adapter methods.

A method file ends with one ``register_method(...)`` call; everything else (the model
wrapper, the recipe schema, the CLI) finds methods here, by recipe name ("lora") or by
PEFT type ("LORA").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.errors import UserInputError

if TYPE_CHECKING:
    from torch import nn

    from lora_cli.adapters.config import AdapterConfig
    from lora_cli.adapters.layers import AdapterLayer


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    """Name used in recipes (``adapter.method``)."""
    peft_type: str
    """PEFT's ``peft_type`` written to adapter_config.json."""
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    """Wraps one base module; ``layer_cls.supports(module)`` says which modules it can wrap."""
    prefix: str
    """Prefix shared by the method's parameter names (``lora_``, ``hada_``, ``lokr_``)."""
    model_hooks: Callable[..., object] | None = None
    """Optional per-model state (AdaLoRA's rank allocator): called as hooks(adapter_model, name)."""

    def supports(self, module: nn.Module) -> bool:
        return self.layer_cls.supports(module)


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    _METHODS[method.name] = method
    return method


def _ensure_loaded() -> None:
    # Importing the package registers every built-in method.
    import lora_cli.adapters.methods  # noqa: F401


def get_method(name: str) -> AdapterMethod:
    """Look a method up by recipe name or PEFT type (case-insensitive)."""
    _ensure_loaded()
    key = str(name).lower()
    for method in _METHODS.values():
        if key in (method.name, method.peft_type.lower()):
            return method
    choices = sorted(_METHODS)
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserInputError(f"unknown adapter method {name!r}: choose one of {', '.join(choices)}{hint}")


def available_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)
