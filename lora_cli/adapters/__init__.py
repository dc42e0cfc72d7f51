"""The adapter engine: LoRA-family adapters injected into any torch model.

Reads and writes PEFT's on-disk format. Depends on torch and safetensors only.
Importing this package registers every built-in method (:mod:`lora_cli.adapters.methods`).
"""

from lora_cli.adapters.combine import AdapterCombineMixin, CombineError
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.convert import ConversionReport, save_as_lora, to_lora
from lora_cli.adapters.layers import AdapterLayer, ModulesToSaveWrapper
from lora_cli.adapters.methods.adalora import AdaLoraConfig
from lora_cli.adapters.methods.loha import LoHaConfig
from lora_cli.adapters.methods.lokr import LoKrConfig
from lora_cli.adapters.methods.lora import LoraConfig, LoraLayer
from lora_cli.adapters.model import AdapterModel, get_adapter_model, load_adapter_model
from lora_cli.adapters.registry import (
    AdapterMethod,
    MethodState,
    available_methods,
    get_method,
    register_method,
)

__all__ = [
    "AdaLoraConfig",
    "AdapterCombineMixin",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterModel",
    "CombineError",
    "ConversionReport",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LoraLayer",
    "MethodState",
    "ModulesToSaveWrapper",
    "available_methods",
    "get_adapter_model",
    "get_method",
    "load_adapter_model",
    "register_method",
    "save_as_lora",
    "to_lora",
]
