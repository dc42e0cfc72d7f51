"""The adapter engine: LoRA-family adapters injected into any torch model.

Reads and writes PEFT's on-disk format. Depends on torch and safetensors only.
Importing this package registers every built-in method (:mod:`lora_cli.adapters.methods`).
"""

from lora_cli.adapters.combine import AdapterCombineMixin, CombineError
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.convert import ConversionReport, save_as_lora, to_lora
from lora_cli.adapters.corda import preprocess_corda
from lora_cli.adapters.eva import get_eva_state_dict, initialize_eva_weights, load_eva_state_dict
from lora_cli.adapters.layers import AdapterLayer, ModulesToSaveWrapper
from lora_cli.adapters.lora_ga import initialize_lora_ga_weights
from lora_cli.adapters.methods.adalora import AdaLoraConfig
from lora_cli.adapters.methods.loha import LoHaConfig
from lora_cli.adapters.methods.lokr import LoKrConfig
from lora_cli.adapters.methods.lora import LoraConfig, LoraLayer
from lora_cli.adapters.methods.p_tuning import PromptEncoderConfig
from lora_cli.adapters.methods.trainable_tokens import TrainableTokensConfig
from lora_cli.adapters.methods.xlora import XLoraConfig
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
    "PromptEncoderConfig",
    "TrainableTokensConfig",
    "XLoraConfig",
    "available_methods",
    "get_adapter_model",
    "get_eva_state_dict",
    "get_method",
    "initialize_eva_weights",
    "initialize_lora_ga_weights",
    "load_adapter_model",
    "load_eva_state_dict",
    "preprocess_corda",
    "register_method",
    "save_as_lora",
    "to_lora",
]
