"""Built-in adapter methods: one file each, registered on import."""

from lora_cli.adapters.methods import lora  # noqa: F401

for _optional in ("loha", "lokr", "adalora"):
    try:  # methods land one by one; a missing file just means "not yet available"
        __import__(f"lora_cli.adapters.methods.{_optional}")
    except ModuleNotFoundError as exc:
        if exc.name != f"lora_cli.adapters.methods.{_optional}":
            raise
