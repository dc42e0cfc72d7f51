"""MiCA (minor component adaptation, arXiv:2604.01694): LoRA whose B is fixed to the r left
singular vectors of W with the smallest singular values, and whose A starts at zero.

    W = U S V^T (S descending);  B = U[:, -r:] (frozen),  A = 0 (trains)
    y = W x + s B A x          -> the update lives in W's least-used output directions

Only A trains, so an adapter costs r * in trainable values; the base weight is untouched
(B A = 0 at the start). The math is :func:`lora_cli.adapters.functional.mica_factors`, the
start of one layer :func:`init_mica`; B is saved in the file like any lora_B (PEFT 0.20+
recomputes it on load and then reads the saved one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import EMBEDDING
from lora_cli.errors import TargetingError

if TYPE_CHECKING:
    from lora_cli.adapters.methods.lora.config import LoraConfig
    from lora_cli.adapters.methods.lora.layer import LoraLayer


class FrozenParameter(nn.Parameter):
    """An adapter tensor that is saved, loaded and moved like the others but never trains:
    ``requires_grad_`` keeps it off, so the model's "only adapter parameters train" pass
    (and ``module.requires_grad_()``) leave it frozen. MiCA's lora_B is one."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> FrozenParameter:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenParameter:
        return super().requires_grad_(False)


@torch.no_grad()
def init_mica(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """B = the minor left singular vectors of W, frozen; A = 0."""
    weight = layer.canonical_weight()
    r = layer.r[name]
    if r > min(weight.shape):
        raise TargetingError(
            f"init_lora_weights='mica' needs r <= {min(weight.shape)} here (weight {tuple(weight.shape)}), "
            f"got r={r}; lower r (rank_pattern can set it for this module alone) or exclude this module"
        )
    a, b = layer.factors(name)
    fa, fb = fn.mica_factors(weight, r)
    a.copy_(fa)
    b.copy_(fb)
    container = layer.lora_embedding_B if layer.kind == EMBEDDING else layer.lora_B
    container[name] = FrozenParameter(b.data)
