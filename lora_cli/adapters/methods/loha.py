"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al., arXiv:2108.06098).

    ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / r      w*_a: (out, r), w*_b: (r, in)

The Hadamard product of two rank-r matrices has rank up to r², so LoHa reaches a higher
rank than LoRA for twice LoRA's parameters. A convolution's kernel is flattened to
(out, in * kh * kw); with ``use_effective_conv2d`` each factor is instead a Tucker
core t (r, r, kh, kw) with w_a (r, out) and w_b (r, in) (LyCORIS, arXiv:2309.14859).
``torch.nn.Conv1d`` works the same way with one kernel dim: flattened (out, in * k), or
cores stored as (r, r, k, 1), PEFT's layout, whose delta (out, in, k, 1) is read as
(out, in, k). Kernels of size 1 (1x1, or k = 1) always stay flat, as in PEFT.

The forward folds ΔW into the weight and runs the base op once (one full-size matmul,
where computing ΔW x separately would take two).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.config import (
    AdapterConfig,
    check_number,
    check_patterns,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.layers import CONV1D, CONV2D, CONVS, LINEAR, NN_CONV1D, AdapterLayer
from lora_cli.adapters.registry import AdapterMethod, register_method
from lora_cli.errors import Problem


def lycoris_problems(config: AdapterConfig) -> list[Problem]:
    """Checks of the fields LoHa and LoKr share."""
    out = check_positive_int("r", config.r)
    out += check_number("alpha", config.alpha)
    out += check_rate("rank_dropout", config.rank_dropout)
    out += check_rate("module_dropout", config.module_dropout)
    if not isinstance(config.use_effective_conv2d, bool):
        out.append(Problem("use_effective_conv2d", "must be true or false", config.use_effective_conv2d))
    return out + check_patterns(config)


@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa settings, with PEFT's field names and defaults."""

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"

    r: int = 8
    """Rank of each of the two factors; the update's rank can reach r squared."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Probability, in training, of zeroing each output row of the update (kept rows rescaled)."""
    module_dropout: float = 0.0
    """Probability, in training, of skipping the whole adapter of a layer for one step."""
    use_effective_conv2d: bool = False
    """Tucker-decomposed kernels for Conv2d / Conv1d kernels larger than 1 (fewer parameters)."""
    init_weights: bool = True
    """True: w2_b = 0, so training starts at the base model; False: all random (tests)."""

    def problems(self) -> list[Problem]:
        out = super().problems() + lycoris_problems(self)
        if not isinstance(self.init_weights, bool):
            out.append(Problem("init_weights", "must be true or false", self.init_weights))
        return out


class LycorisLayer(AdapterLayer):
    """Bookkeeping LoHa and LoKr share: alpha / r scaling, rank and module dropout."""

    supported_kinds = (LINEAR, CONV1D, NN_CONV1D, CONV2D)
    rescale_rank_dropout: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    def add_common(self, name: str, config: AdapterConfig, r: int, alpha: float) -> None:
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

    def tucker_kernel(self, config: AdapterConfig) -> tuple[int, int] | None:
        """The (kh, kw) of a Tucker core when ``use_effective_conv2d`` applies here, else None.

        Only convolutions with a kernel larger than 1 get a core; a Conv1d's is (k, 1), the
        layout PEFT stores, so its delta comes out (out, in, k, 1) and reshapes to the kernel.
        """
        kernel = self.kernel_shape()
        if self.kind not in CONVS or not config.use_effective_conv2d or all(k == 1 for k in kernel):
            return None
        return (kernel[0], 1) if self.kind == NN_CONV1D else (kernel[0], kernel[1])


class LoHaLayer(LycorisLayer):
    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def add(self, name: str, config: LoHaConfig, r: int, alpha: float) -> None:
        self.add_common(name, config, r, alpha)
        out, fan_in, *kernel = self.canonical_weight().shape  # conv: in = in_channels // groups
        core = self.tucker_kernel(config)
        if core is not None:
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[name] = self.new_param(r, r, *core)
                getattr(self, f"hada_w{i}_a")[name] = self.new_param(r, out)
                getattr(self, f"hada_w{i}_b")[name] = self.new_param(r, fan_in)
        else:
            for i in ("1", "2"):
                getattr(self, f"hada_w{i}_a")[name] = self.new_param(out, r)
                getattr(self, f"hada_w{i}_b")[name] = self.new_param(r, fan_in * math.prod(kernel))
        with torch.no_grad():
            for _, param in self.adapter_tensors(name):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b[name])

    def get_delta_weight(self, name: str) -> Tensor:
        w1_a, w1_b, w2_a, w2_b = (getattr(self, f"hada_w{k}")[name] for k in ("1_a", "1_b", "2_a", "2_b"))
        if name in self.hada_t1:
            t1, t2 = self.hada_t1[name], self.hada_t2[name]
            delta = fn.loha_delta_cp(t1, w1_a, w1_b, t2, w2_a, w2_b, self.scaling[name])
        else:
            delta = fn.loha_delta(w1_a, w1_b, w2_a, w2_b, self.scaling[name])
        return delta.reshape(self.canonical_weight().shape)


register_method(AdapterMethod(name="loha", peft_type="LOHA", config_cls=LoHaConfig, layer_cls=LoHaLayer, prefix="hada_"))
