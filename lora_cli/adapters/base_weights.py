"""Base weights saved beside an adapter: ``base_rewrites.safetensors``.

A start that changes base weights by more than a low-rank update (LoftQ's dequantized
weights; a rewritten layer under DoRA) saves the changed weights themselves beside the
adapter files, keyed ``<module path>.weight`` as in the base model's own state dict
(:mod:`lora_cli.adapters.methods.lora.base_rewrites` says which). Loading an adapter copies
them into the base first, whatever its method. A PEFT user does the same:
``base.load_state_dict(safetensors.torch.load_file(".../base_rewrites.safetensors"), strict=False)``
and then ``PeftModel.from_pretrained(base, ...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_cli import atomic
from lora_cli.adapters.tensor_files import load_safetensors
from lora_cli.errors import UserInputError

BASE_REWRITES_NAME = "base_rewrites.safetensors"
"""The rewritten base weights (LoftQ's dequantized ones) saved beside an adapter."""


def write_base_weights(directory: Path, weights: Mapping[str, Tensor]) -> None:
    """``base_rewrites.safetensors`` in ``directory`` (removed when there are none)."""
    file = directory / BASE_REWRITES_NAME
    if not weights:
        file.unlink(missing_ok=True)
        return
    with atomic.atomic_file(file) as tmp:
        save_file(dict(weights), str(tmp), metadata={"format": "pt"})


@torch.no_grad()
def apply_base_weights(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Copy ``directory``'s ``base_rewrites.safetensors`` (if any) into ``model``'s weights
    before an adapter that needs them is loaded. True when there was one."""
    file = Path(directory) / BASE_REWRITES_NAME
    if not file.is_file():
        return False
    weights = load_safetensors(file)
    for key, tensor in weights.items():
        path, _, leaf = key.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        module = getattr(module, "base_layer", module)
        target = getattr(module, leaf, None) if module is not None else None
        if not isinstance(target, Tensor) or target.shape != tensor.shape:
            found = "no such weight" if not isinstance(target, Tensor) else f"shape {tuple(target.shape)}"
            raise UserInputError(
                f"{file}: {key} {tuple(tensor.shape)} does not fit this model ({found}); these are the rewritten "
                "base weights of the adapter beside it, saved for the base model it was trained on. Load the "
                "adapter on that base model"
            )
        target.data.copy_(tensor.to(target))
    return True
