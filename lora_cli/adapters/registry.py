"""One table of adapter methods.

A method file ends with one ``register_method(ConfigCls, LayerCls, prefix=...)`` call;
the method's recipe name and PEFT type come from its config class (``method`` and
``peft_type``). Everything else (the model wrapper, the recipe schema, the CLI) finds
methods here, by recipe name ("lora") or by PEFT type ("LORA").

The table is filled by importing :mod:`lora_cli.adapters` (whose ``methods`` package
imports every method file); this module imports no method, so configs can look methods
up without an import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.errors import LoraCliError, UserInputError, close_matches

if TYPE_CHECKING:
    from torch import Tensor, nn

    from lora_cli.adapters.config import AdapterConfig
    from lora_cli.adapters.layers import AdapterLayer
    from lora_cli.adapters.model import AdapterModel

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PEFT_TYPE = re.compile(r"[A-Z][A-Z0-9_]*")
_PREFIX = re.compile(r"[a-z][a-z0-9]*_")


class MethodState:
    """Per-model state a method may keep beside its layers (AdaLoRA's rank allocator).

    One instance per adapter, built as ``state_cls(adapter_model, adapter_name)``. The
    defaults do nothing, so a method without such state needs no subclass.
    """

    def __init__(self, model: AdapterModel, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def regularizer(self) -> Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def export(self, state: dict[str, Tensor], config: AdapterConfig) -> tuple[dict[str, Tensor], AdapterConfig]:
        """Adjust the state dict and config being saved."""
        return state, config

    def before_load(self, config: AdapterConfig) -> None:
        """Reshape the layers to fit a saved adapter before its tensors are copied in."""

    def update_and_allocate(self, global_step: int) -> None:
        raise LoraCliError(f"{type(self).__name__}: this method has no rank allocation")


@dataclass(frozen=True)
class AdapterMethod:
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer] | None
    """Wraps one base module; ``layer_cls.supports(module)`` says which modules it can wrap."""
    prefix: str
    """Prefix shared by the method's parameter names (``lora_``, ``hada_``, ``lokr_``)."""
    state_cls: type[MethodState] | None = None
    """Optional per-model state (AdaLoRA's rank allocator), see :class:`MethodState`."""
    model_cls: type[nn.Module] | None = None
    """For methods that are not a layer wrapped in place (prompt learning, X-LoRA's gated
    experts): the model class that replaces :class:`~lora_cli.adapters.model.AdapterModel`.
    It is built as ``model_cls(base_model, config, adapter_name)`` and offers the same
    ``from_pretrained(model, model_id, adapter_name=..., is_trainable=...)`` and
    ``save_pretrained(directory)``. ``layer_cls`` may then be None."""

    @property
    def name(self) -> str:
        """Name used in recipes (``adapter.method``): the config's ``method``."""
        return self.config_cls.method

    @property
    def peft_type(self) -> str:
        """PEFT's ``peft_type`` written to adapter_config.json: the config's ``peft_type``."""
        return self.config_cls.peft_type

    def supports(self, module: nn.Module) -> bool:
        return self.layer_cls is not None and self.layer_cls.supports(module)


_METHODS: dict[str, AdapterMethod] = {}


def register_method(
    config_cls: type[AdapterConfig],
    layer_cls: type[AdapterLayer] | None,
    *,
    prefix: str,
    state_cls: type[MethodState] | None = None,
    model_cls: type[nn.Module] | None = None,
) -> AdapterMethod:
    """Add a method to the table; refuses malformed names and names already taken.

    A name is taken when it equals, case-insensitively, the recipe name or the PEFT type
    of a registered method: :func:`get_method` looks methods up by either.
    """
    name, peft_type = getattr(config_cls, "method", None), getattr(config_cls, "peft_type", None)
    where = getattr(config_cls, "__qualname__", repr(config_cls))
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.method must be a lower-case identifier such as 'lora', got {name!r}")
    if not isinstance(peft_type, str) or not _PEFT_TYPE.fullmatch(peft_type):
        raise ValueError(f"{where}.peft_type must be an upper-case identifier such as 'LORA', got {peft_type!r}")
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(f"{name}: prefix must look like 'lora_' (letters and digits, then '_'), got {prefix!r}")
    if layer_cls is None and model_cls is None:
        raise TypeError(f"{name}: give layer_cls (an AdapterLayer subclass), model_cls, or both")
    if layer_cls is not None and not callable(getattr(layer_cls, "supports", None)):
        raise TypeError(f"{name}: layer_cls must be an AdapterLayer subclass, got {layer_cls!r}")
    keys = {name, peft_type.lower()}
    for other in _METHODS.values():
        taken = keys & {other.name, other.peft_type.lower()}
        if taken:
            raise ValueError(
                f"cannot register {where}: {' and '.join(map(repr, sorted(taken)))} already names the "
                f"{other.name} method ({other.config_cls.__qualname__})"
            )
    method = AdapterMethod(
        config_cls=config_cls, layer_cls=layer_cls, prefix=prefix, state_cls=state_cls, model_cls=model_cls
    )
    _METHODS[name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    """Look a method up by recipe name or PEFT type (case-insensitive)."""
    key = str(name).lower()
    for method in _METHODS.values():
        if key in (method.name, method.peft_type.lower()):
            return method
    choices = sorted(_METHODS)
    close = close_matches(key, choices)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserInputError(f"unknown adapter method {name!r}: choose one of {', '.join(choices)}{hint}")


def available_methods() -> list[str]:
    return sorted(_METHODS)
