"""MiCA (minor component adaptation, arXiv:2604.01694): LoRA whose B is fixed to the r left
singular vectors of W with the smallest singular values, and whose A starts at zero.

    W = U S V^T (S descending);  B = U[:, -r:] (frozen),  A = 0 (trains)
    y = W x + s B A x          -> the update lives in W's least-used output directions

Only A trains, so an adapter costs r * in trainable values; the base weight is untouched
(B A = 0 at the start). The math is :func:`lora_cli.adapters.functional.mica_factors`, the
layer branch ``LoraLayer._init_from_weight``; B is saved in the file like any lora_B
(PEFT 0.20+ recomputes it on load and then reads the saved one).
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenParameter(nn.Parameter):
    """An adapter tensor that is saved, loaded and moved like the others but never trains:
    ``requires_grad_`` keeps it off, so the model's "only adapter parameters train" pass
    (and ``module.requires_grad_()``) leave it frozen. MiCA's lora_B is one."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> FrozenParameter:
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenParameter:
        return super().requires_grad_(False)
