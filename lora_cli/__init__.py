"""loracli: fine-tune pretrained models with LoRA-family adapters from one YAML recipe."""

__version__ = "0.1.0"
