"""The layer base LoHa and LoKr share (the LyCORIS family, arXiv:2309.14859).

Both scale their delta by alpha / r and regularise it two ways in training:

- rank dropout zeroes each output row of ΔW with probability ``rank_dropout`` (kept rows
  rescaled by 1 / kept fraction, always for LoHa, with ``rank_dropout_scale`` for LoKr);
- module dropout skips a layer's whole adapter for one step with probability ``module_dropout``.

Both adapt Linear, GPT-2's Conv1D, ``nn.Conv1d`` and ``nn.Conv2d``, and on convolutions
with a kernel larger than 1 can keep a Tucker core (``use_effective_conv2d``).
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import CONV2D, CONVS, HF_CONV1D, LINEAR, TORCH_CONV1D
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.methods.lycoris.config import LycorisConfig


class LycorisLayer(AdapterLayer):
    """Bookkeeping LoHa and LoKr share: alpha / r scaling, rank and module dropout."""

    supported_kinds = (LINEAR, HF_CONV1D, TORCH_CONV1D, CONV2D)
    rescale_rank_dropout: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    def add_common(self, name: str, config: LycorisConfig, r: int, alpha: float) -> None:
        self.r[name] = r
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.rank_dropout_scale[name] = getattr(config, "rank_dropout_scale", self.rescale_rank_dropout)
        self.module_dropout[name] = config.module_dropout
        base = self.base_layer
        if self.kind in CONVS and getattr(base, "padding_mode", "zeros") != "zeros":
            warnings.warn(
                f"{type(self).__name__.removesuffix('Layer')} on {base}: the adapter's delta runs with this conv's "
                f"padding mode ({base.padding_mode!r}), so merging is exact, but PEFT pads with zeros there: the "
                "same adapter file gives different outputs in PEFT",
                stacklevel=2,
            )

    @torch.no_grad()
    def kaiming_init(self, name: str) -> None:
        """Every tensor of adapter ``name`` drawn as ``nn.Linear`` draws its weight."""
        for _, param in self.adapter_tensors(name):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))

    def extra_repr_for(self, name: str) -> str:
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}"

    def skip_in_forward(self, name: str) -> bool:
        p = self.module_dropout[name]
        return self.training and p > 0 and torch.rand(1).item() <= p

    def row_mask(self, name: str, like: Tensor) -> Tensor | None:
        """Rank-dropout keep-mask over output rows (out,), or None outside training."""
        p = self.rank_dropout[name]
        if not (self.training and p > 0):
            return None
        return fn.rank_dropout_mask(self.out_features, p, self.rank_dropout_scale[name], like)

    def training_delta(self, name: str) -> Tensor:
        delta = self.get_delta_weight(name)
        mask = self.row_mask(name, delta)
        return delta if mask is None else delta * mask.view(-1, *[1] * (delta.dim() - 1))

    def kernel_shape(self) -> tuple[int, ...]:
        """(kh, kw) or (k,) of a convolution, () otherwise."""
        return tuple(self.canonical_weight().shape[2:])

    def tucker_kernel(self, config: LycorisConfig) -> tuple[int, int] | None:
        """The (kh, kw) of a Tucker core when ``use_effective_conv2d`` applies here, else None.

        Only convolutions with a kernel larger than 1 get a core; a Conv1d's is (k, 1), the
        layout PEFT stores, so its delta comes out (out, in, k, 1) and reshapes to the kernel.
        """
        kernel = self.kernel_shape()
        if self.kind not in CONVS or not config.use_effective_conv2d or all(k == 1 for k in kernel):
            return None
        return (kernel[0], 1) if self.kind == TORCH_CONV1D else (kernel[0], kernel[1])
