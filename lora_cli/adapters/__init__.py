"""The adapter engine: LoRA-family adapters injected into any torch model.

Reads and writes PEFT's on-disk format. Depends on torch and safetensors only.
"""

from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.methods.lora import LoraConfig, LoraLayer
from lora_cli.adapters.model import (
    AdapterHooks,
    AdapterModel,
    ModulesToSaveWrapper,
    get_adapter_model,
)
from lora_cli.adapters.registry import AdapterMethod, available_methods, get_method, register_method


def __getattr__(name: str):
    # Methods that land in later files; importing the name before then says so clearly.
    lazy = {"LoHaConfig": "loha", "LoKrConfig": "lokr", "AdaLoraConfig": "adalora"}
    if name in lazy:
        import importlib

        try:
            module = importlib.import_module(f"lora_cli.adapters.methods.{lazy[name]}")
        except ModuleNotFoundError:
            raise NotImplementedError(f"{name} is not yet available in this version of loracli") from None
        return getattr(module, name)
    raise AttributeError(f"module 'lora_cli.adapters' has no attribute {name!r}")


__all__ = [
    "AdapterConfig",
    "AdapterHooks",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterModel",
    "LoraConfig",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "available_methods",
    "get_adapter_model",
    "get_method",
    "register_method",
]
