"""Where a model runs: the one place loracli picks a device and reads a model's device/dtype."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lora_cli.errors import UserInputError

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when it is usable, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but no CUDA device is available; use cpu")
        return device
    try:
        if torch.cuda.is_available():
            return torch.device("cuda")
    except Exception:  # noqa: BLE001 - a broken driver must not stop CPU inference
        logger.warning("CUDA check failed; using the CPU", exc_info=True)
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when there is none)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32
