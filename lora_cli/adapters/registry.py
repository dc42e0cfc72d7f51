"""One table of adapter methods.

Each method is entered by one ``register_method(ConfigCls, layer, prefix=..., ...)`` call; the
built-in ones are all listed in :mod:`lora_cli.adapters.methods`. The method's recipe name and
PEFT type come from its config class (``method`` and ``peft_type``). Everything else (the model
wrapper, the recipe schema, the CLI) finds methods here, by recipe name ("lora") or by PEFT
type ("LORA").

The torch side of a method (its layer, model, per-model state, injectors) may be given as a
``"package.module:attribute"`` reference, loaded when first used: looking a method and its
config up by name imports no torch, so recipes are checked without it. This module imports
no other module of the engine.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_cli.errors import UserInputError, close_matches

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PEFT_TYPE = re.compile(r"[A-Z][A-Z0-9_]*")
_PREFIX = re.compile(r"[a-z][a-z0-9]*_")
_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

Ref = Any
"""A class or function, or a ``"package.module:attribute"`` string naming one."""


def load(ref: Ref) -> Any:
    """What ``ref`` names (imported now; the module's attribute is read at every call, so a test may
    replace it), or ``ref`` itself when it is no string."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class AdapterMethod:
    """A registered method: its config class, and references to its torch side (see :func:`load`)."""

    config_cls: type
    """The method's :class:`~lora_cli.adapters.config.AdapterConfig` subclass (imports no torch)."""
    layer: Ref | None
    """An :class:`~lora_cli.adapters.layers.AdapterLayer` subclass: wraps one base module in place."""
    prefix: str
    """Prefix shared by the method's parameter names (``lora_``, ``hada_``, ``lokr_``)."""
    state: Ref | None = None
    """Optional per-model state (AdaLoRA's rank allocator), a :class:`~lora_cli.adapters.model.MethodState`."""
    model: Ref | None = None
    """For methods that are not only a layer wrapped in place (prompt learning, X-LoRA's gated
    experts, trainable tokens' ties): the model class that replaces
    :class:`~lora_cli.adapters.model.AdapterModel`, built as ``model_cls(base_model, config,
    adapter_name)`` with the same ``from_pretrained`` / ``save_pretrained``. ``layer`` may then be None."""
    kind_layers: Mapping[str, Ref] = field(default_factory=dict)
    """{layer kind: layer class} for the kinds the method wraps with a layer of their own (LoRA's
    ``nn.MultiheadAttention``)."""
    injectors: tuple[Ref, ...] = ()
    """Functions that add adapter layers beside the targeted modules (LoRA's trainable tokens and
    parameter targets), called in order as ``inject(model, adapter_name, config, aliases)``; each
    returns the paths of the layers it gave the adapter."""
    to_original_base: Ref | None = None
    """``f(model, adapter_name, state, config) -> (state, config, base weights)``: the saved adapter
    relative to the original base, for a method whose starts rewrite base weights (LoRA's PiSSA...)."""

    @property
    def name(self) -> str:
        """Name used in recipes (``adapter.method``): the config's ``method``."""
        return self.config_cls.method

    @property
    def peft_type(self) -> str:
        """PEFT's ``peft_type`` written to adapter_config.json: the config's ``peft_type``."""
        return self.config_cls.peft_type

    @property
    def layer_cls(self) -> type | None:
        return load(self.layer)

    @property
    def state_cls(self) -> type | None:
        return load(self.state)

    @property
    def model_cls(self) -> type | None:
        return load(self.model)

    def injector_fns(self) -> list[Callable[..., list[str]]]:
        return [load(ref) for ref in self.injectors]

    def layer_for(self, module: Any) -> type:
        """The layer class that wraps ``module``: the method's own for its kind, else ``layer_cls``."""
        layer_cls = self.layer_cls
        special = self.kind_layers.get(layer_cls.kind_of(module))
        return layer_cls if special is None else load(special)

    def refusal(self, module: Any) -> str | None:
        """Why this method cannot wrap ``module`` (with the fix), or None when it can."""
        return self.layer_for(module).refusal(module)

    def supports(self, module: Any) -> bool:
        return self.layer is not None and self.refusal(module) is None


_METHODS: dict[str, AdapterMethod] = {}


def register_method(
    config_cls: type,
    layer_cls: Ref | None = None,
    *,
    prefix: str,
    state_cls: Ref | None = None,
    model_cls: Ref | None = None,
    kind_layers: Mapping[str, Ref] | None = None,
    injectors: tuple[Ref, ...] = (),
    to_original_base: Ref | None = None,
) -> AdapterMethod:
    """Add a method to the table; refuses malformed names and names already taken.

    A name is taken when it equals, case-insensitively, the recipe name or the PEFT type
    of a registered method: :func:`get_method` looks methods up by either. The torch side
    may be given as classes and functions, or as ``"package.module:attribute"`` references.
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
    if layer_cls is not None and not isinstance(layer_cls, str) and not callable(getattr(layer_cls, "supports", None)):
        raise TypeError(f"{name}: layer_cls must be an AdapterLayer subclass, got {layer_cls!r}")
    refs = [layer_cls, state_cls, model_cls, to_original_base, *injectors, *(kind_layers or {}).values()]
    for ref in refs:
        if isinstance(ref, str) and not _REF.fullmatch(ref):
            raise ValueError(f"{name}: {ref!r} is no reference; write 'package.module:attribute'")
    keys = {name, peft_type.lower()}
    for other in _METHODS.values():
        taken = keys & {other.name, other.peft_type.lower()}
        if taken:
            raise ValueError(
                f"cannot register {where}: {' and '.join(map(repr, sorted(taken)))} already names the "
                f"{other.name} method ({other.config_cls.__qualname__})"
            )
    method = AdapterMethod(config_cls=config_cls, layer=layer_cls, prefix=prefix, state=state_cls, model=model_cls,
                           kind_layers=dict(kind_layers or {}), injectors=tuple(injectors),
                           to_original_base=to_original_base)
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
