"""What the calibration passes of the data-driven starts (EVA, CorDA, LoRA-GA) share: a batch
forwarded, the token rows a layer saw, the layers calibrated, an adapter resized to the rank a
pass gave it, and A and B set from a recorded start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.methods.lora.starts import MATRICES
from lora_cli.errors import UserInputError

Forward = Callable[[nn.Module, Any], Any]


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """The default forward of a calibration batch: ``model(**batch)`` for a mapping."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def token_mask(batch: Any, label_mask_value: int | None) -> Tensor | None:
    """(batch, seq) bool of the token positions to use: the attention mask (padding out),
    and with ``label_mask_value`` token labels equal to it out too. None: use every row."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None and ids is None:
        return None
    mask = (torch.ones_like(ids) if mask is None else mask).bool()
    labels = batch.get("labels")
    if label_mask_value is not None and isinstance(labels, Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != label_mask_value)  # sequence-level labels (classification) mask nothing
    return mask


def layer_rows(x: Any, mask: Tensor | None) -> Tensor:
    """A layer's input as (rows, in): the masked token positions, else every position."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def calibrated_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(path, layer) of adapter ``adapter_name``'s Linear / GPT-2 Conv1D layers, in model order."""

    out = []
    for path, layer in model.adapter_layers():
        if adapter_name in layer.r and layer.kind in MATRICES and hasattr(layer, "lora_A"):
            out.append((path, layer))
    return out


def check_adapter(model: nn.Module, adapter_name: str, init: str, caller: str) -> Any:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise UserInputError(f"{caller}: the model has no adapter {adapter_name!r}; inject one with get_adapter_model first")
    if getattr(config, "init_lora_weights", None) != init:
        raise UserInputError(
            f"{caller} is for adapters created with init_lora_weights={init!r}; adapter {adapter_name!r} has "
            f"{getattr(config, 'init_lora_weights', None)!r}"
        )
    return config


@torch.no_grad()
def resize_adapter(model: nn.Module, path: str, adapter_name: str, r: int, alpha: float) -> None:
    """Give ``path``'s adapter rank ``r`` and scale numerator ``alpha`` (fresh zero-delta
    factors); r = 0 removes the adapter from the layer, and the wrapper when it holds no other."""
    layer = model.base_model.get_submodule(path)
    config = model.peft_config[adapter_name]
    active = list(layer.active_adapters)
    layer.delete(adapter_name)
    if r == 0:
        model.targets[adapter_name] = [p for p in model.targets[adapter_name] if p != path]
        if not layer.r:
            model.base_model.set_submodule(path, layer.base_layer)
        return
    layer.add(adapter_name, config, r, alpha)
    layer.active_adapters = active


@torch.no_grad()
def set_factors(layer: nn.Module, adapter_name: str, a: Tensor, b: Tensor) -> None:
    """A and B of ``adapter_name`` set to a recorded start, the base untouched (EVA's)."""
    layer.lora_A[adapter_name].copy_(a)
    layer.lora_B[adapter_name].copy_(b)
