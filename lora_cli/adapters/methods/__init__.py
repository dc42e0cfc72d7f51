"""The built-in adapter methods: the one place that lists them, one ``register_method`` call each.

A method is a package (LoRA's holds its variants and its starts) whose ``config.py`` imports no
torch; its layer, model, per-model state and injectors are named here as
``"package.module:attribute"`` and loaded when a model is first built, so looking a method up
by name (validating a recipe) imports no torch. To add a method: its package, one call below,
and a row in tests/adapters/test_contract.py (CONTRIBUTING.md, "add a method").
"""

from lora_cli.adapters.kinds import MHA
from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
from lora_cli.adapters.methods.lora.config import LoraConfig
from lora_cli.adapters.methods.lycoris.config import LoHaConfig, LoKrConfig
from lora_cli.adapters.methods.p_tuning.config import PromptEncoderConfig
from lora_cli.adapters.methods.trainable_tokens.config import TrainableTokensConfig
from lora_cli.adapters.methods.xlora.config import XLoraConfig
from lora_cli.adapters.registry import register_method

_HERE = "lora_cli.adapters.methods"
_TOKENS = f"{_HERE}.trainable_tokens.layer:inject_lora_tokens"
"""LoRA's and AdaLoRA's ``trainable_token_indices``: token rows trained beside the adapter."""

register_method(
    LoraConfig, f"{_HERE}.lora.layer:LoraLayer", prefix="lora_",
    kind_layers={MHA: f"{_HERE}.lora.mha:LoraMhaLayer"},
    injectors=(_TOKENS, f"{_HERE}.lora.param:inject_parameter_targets"),
    to_original_base=f"{_HERE}.lora.base_rewrites:convert_to_original_base",
)
register_method(AdaLoraConfig, f"{_HERE}.adalora.layer:AdaLoraLayer", prefix="lora_",
                state_cls=f"{_HERE}.adalora.state:AdaLoraState", injectors=(_TOKENS,))
register_method(LoHaConfig, f"{_HERE}.lycoris.loha:LoHaLayer", prefix="hada_")
register_method(LoKrConfig, f"{_HERE}.lycoris.lokr:LoKrLayer", prefix="lokr_")
register_method(TrainableTokensConfig, f"{_HERE}.trainable_tokens.layer:TrainableTokensLayer", prefix="trainable_",
                model_cls=f"{_HERE}.trainable_tokens.layer:TrainableTokensModel")
register_method(PromptEncoderConfig, prefix="prompt_", model_cls=f"{_HERE}.p_tuning.model:PromptLearningModel")
register_method(XLoraConfig, prefix="xlora_", model_cls=f"{_HERE}.xlora.model:XLoraModel")
