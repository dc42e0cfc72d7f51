"""Built-in adapter methods: LoRA registered here, the others (one file each) on import."""

from lora_cli.adapters.kinds import MHA
from lora_cli.adapters.methods.lora.config import LoraConfig
from lora_cli.adapters.registry import register_method

_HERE = "lora_cli.adapters.methods"

register_method(
    LoraConfig, f"{_HERE}.lora.layer:LoraLayer", prefix="lora_",
    kind_layers={MHA: f"{_HERE}.lora.mha:LoraMhaLayer"},
    injectors=(f"{_HERE}.trainable_tokens:inject_lora_tokens", f"{_HERE}.lora.param:inject_parameter_targets"),
    to_original_base=f"{_HERE}.lora.base_rewrites:convert_to_original_base",
)

from lora_cli.adapters.methods import adalora, loha, lokr  # noqa: E402, F401  # isort: skip
from lora_cli.adapters.methods import p_tuning  # noqa: E402, F401  # isort: skip
from lora_cli.adapters.methods import trainable_tokens  # noqa: E402, F401  # isort: skip
from lora_cli.adapters.methods import xlora  # noqa: E402, F401  # isort: skip
