"""The adapter engine: LoRA-family adapters injected into any torch model.

Reads and writes PEFT's on-disk format. Depends on torch and safetensors only, and imports
neither until a name that needs them is used: importing this package registers every built-in
method (:mod:`lora_cli.adapters.methods`, their configs only), and the names below are loaded
on first use, so ``lora_cli.adapters.config`` and every method's config import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from lora_cli.adapters import methods as _methods  # noqa: F401 - fills the method table

_EXPORTS = {
    "AdapterCombineMixin": "combine", "CombineError": "combine",
    "AdapterConfig": "config",
    "ConversionReport": "convert", "save_as_lora": "convert", "to_lora": "convert",
    "AdapterLayer": "layers", "ModulesToSaveWrapper": "modules_to_save",
    "AdaLoraConfig": "methods.adalora.config",
    "LoHaConfig": "methods.lycoris.config",
    "LoKrConfig": "methods.lycoris.config",
    "LoraConfig": "methods.lora.config", "LoraLayer": "methods.lora.layer",
    "preprocess_corda": "methods.lora.corda",
    "get_eva_state_dict": "methods.lora.eva", "initialize_eva_weights": "methods.lora.eva",
    "load_eva_state_dict": "methods.lora.eva",
    "initialize_lora_ga_weights": "methods.lora.lora_ga",
    "PromptEncoderConfig": "methods.p_tuning.config",
    "TrainableTokensConfig": "methods.trainable_tokens.config",
    "XLoraConfig": "methods.xlora.config",
    "AdapterModel": "model", "MethodState": "model", "get_adapter_model": "model", "load_adapter_model": "model",
    "AdapterMethod": "registry", "available_methods": "registry", "get_method": "registry",
    "register_method": "registry",
}
"""Public name -> the module below this package that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
