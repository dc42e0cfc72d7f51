"""LoHa / LoKr adapters as plain LoRA (PEFT 0.19's ``save_as_lora`` idea), for engines that serve LoRA only.

Each adapted layer's delta ΔW (out, in[, *kernel]), flattened to (out, n), is factorised
by SVD, ΔW = U S V^T, and truncated at rank k:

    B = U_k sqrt(S_k)   (out, k)        A = sqrt(S_k) V_k^T   (k, n)     lora_alpha = k (scale 1)

k is fixed (``rank``) or the smallest rank whose singular values hold ``energy`` of
sum(S^2). The error this introduces is exact and reported per layer:

    relative Frobenius error = ||ΔW - B A||_F / ||ΔW||_F = sqrt(sum_{i>k} s_i^2 / sum_i s_i^2)

Layers whose k differs from the adapter's ``r`` get it (and alpha = k) through
``rank_pattern`` / ``alpha_pattern`` keyed by their escaped module paths. Heads trained in
full (``modules_to_save``) are copied as they are.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_cli.adapters.kinds import CONVS
from lora_cli.adapters.methods.lora.config import LoraConfig
from lora_cli.adapters.state import KEY_PREFIX, save_adapter_files
from lora_cli.adapters.tensor_files import check_finite
from lora_cli.errors import UserInputError

if TYPE_CHECKING:
    from lora_cli.adapters.model import AdapterModel

CONVERTIBLE = ("loha", "lokr")


@dataclass
class LayerConversion:
    path: str
    rank: int
    relative_error: float
    """||ΔW - B A||_F / ||ΔW||_F (0 for a zero delta)."""


@dataclass
class ConversionReport:
    layers: list[LayerConversion] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    @property
    def worst(self) -> LayerConversion | None:
        return max(self.layers, key=lambda layer: layer.relative_error, default=None)

    def to_dict(self) -> dict:
        return {"max_relative_error": self.max_error,
                "layers": {layer.path: {"rank": layer.rank, "relative_error": layer.relative_error}
                           for layer in self.layers}}


def check_choice(rank: int | None, energy: float | None) -> None:
    """Exactly one of ``rank`` (>= 1) and ``energy`` (in (0, 1])."""
    if (rank is None) == (energy is None):
        raise UserInputError("give exactly one of rank (a fixed LoRA rank, e.g. 8) or energy (e.g. 0.99)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UserInputError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise UserInputError(f"energy is the fraction of the squared singular values kept, in (0, 1]; got {energy!r}")


def chosen_rank(singular: Tensor, rank: int | None, energy: float | None) -> int:
    """The fixed rank (at most the number of singular values), or the smallest holding ``energy``."""
    if rank is not None:
        return min(rank, singular.numel())
    power = singular.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    held = torch.cumsum(power, 0) / total
    return min(int((held < energy - 1e-12).sum()) + 1, singular.numel())


def to_lora(model: AdapterModel, adapter_name: str | None = None, rank: int | None = None,
            energy: float | None = None) -> tuple[LoraConfig, dict[str, Tensor], ConversionReport]:
    """The LoRA config and PEFT-format tensors that approximate adapter ``adapter_name``."""
    check_choice(rank, energy)
    name = adapter_name or model.active_adapter
    source = model.peft_config[name]
    if source.method not in CONVERTIBLE:
        raise UserInputError(
            f"adapter {name!r} is a {source.method} adapter; conversion to LoRA takes LoHa or LoKr adapters"
            + (" (it is LoRA already)" if source.method == "lora" else "")
        )
    state: dict[str, Tensor] = {}
    report = ConversionReport()
    with torch.no_grad():
        for path, layer in model.adapter_layers():
            if name not in layer.r:
                continue
            if layer.kind in CONVS and layer.base_layer.groups > 1:
                raise UserInputError(
                    f"{path} is a grouped convolution (groups={layer.base_layer.groups}): its {source.method} delta "
                    "has no LoRA form (PEFT's LoRA A mixes all input channels); exclude it from the adapter"
                )
            delta = layer.get_delta_weight(name).float()
            check_finite({path: delta}, f"the {source.method} delta weight",
                         "a float32 overflow: the adapter's factors are too large, so it has no LoRA form")  # before the SVD
            flat = delta.reshape(delta.shape[0], -1)  # (out, in * kernel)
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            k = chosen_rank(s, rank, energy)
            total = float((s.double() ** 2).sum())
            error = math.sqrt(float((s[k:].double() ** 2).sum()) / total) if total > 0 else 0.0
            root = s[:k].sqrt()
            b = (u[:, :k] * root).reshape(delta.shape[0], k, *[1] * (delta.dim() - 2))
            a = (root[:, None] * vh[:k]).reshape(k, *delta.shape[1:])
            dtype = layer.adapter_dtype()
            state[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
            state[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
            report.layers.append(LayerConversion(path, k, error))
    if not report.layers:
        raise UserInputError(f"adapter {name!r} adapts no layer; nothing to convert")
    for key, tensor in model.get_adapter_state_dict(name).items():
        if not any(key.startswith(f"{KEY_PREFIX}{p}.") for p, _ in model.adapter_layers()):
            state[key] = tensor  # modules_to_save copies, biases
    r = rank if rank is not None else max(layer.rank for layer in report.layers)
    pattern = {re.escape(layer.path): layer.rank for layer in report.layers if layer.rank != r}
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(layer.path for layer in report.layers),
        rank_pattern=pattern, alpha_pattern=dict(pattern), modules_to_save=source.modules_to_save,
        task_type=source.task_type, base_model_name_or_path=source.base_model_name_or_path,
        revision=source.revision, inference_mode=True,
    )
    return config, state, report


def save_as_lora(model: AdapterModel, directory: str | os.PathLike, adapter_name: str | None = None,
                 rank: int | None = None, energy: float | None = None) -> ConversionReport:
    """Write the LoRA form of a LoHa / LoKr adapter to ``directory`` (PEFT format, both files or neither)."""
    config, state, report = to_lora(model, adapter_name, rank, energy)
    if config.base_model_name_or_path is None:
        base_config = getattr(model.base_model, "config", None)
        config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
    save_adapter_files(Path(directory), state, config)
    return report
