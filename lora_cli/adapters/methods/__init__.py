"""Built-in adapter methods: one file each, registered on import."""

from lora_cli.adapters.methods import adalora, dora, loha, lokr, lora, lora_mha  # noqa: F401
