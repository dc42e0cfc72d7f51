"""Built-in adapter methods: one file each, registered on import."""

from lora_cli.adapters.methods import adalora, dora, loha, lokr, lora, lora_mha  # noqa: F401

from lora_cli.adapters.methods import p_tuning  # noqa: F401  # isort: skip
from lora_cli.adapters.methods import trainable_tokens  # noqa: F401  # isort: skip
from lora_cli.adapters.methods import lora_param  # noqa: F401  # isort: skip
from lora_cli.adapters.methods import xlora  # noqa: F401  # isort: skip
