"""LoRA: low-rank adaptation (Hu et al., arXiv:2106.09685), with rsLoRA and DoRA.

    y = W x + s * B (A (dropout(x)))        A: (r, in), B: (out, r), s = alpha / r

rsLoRA (arXiv:2312.03732) uses s = alpha / sqrt(r). DoRA (arXiv:2402.09353) learns a
per-row magnitude m and rescales the adapted weight to it:

    y = W x + (g - 1) W x + g s B A x,      g = m / ||W + s B A||  (norm detached)

On convolutions (``nn.Conv1d``, ``nn.Conv2d``) A is a conv with the base kernel/stride/
padding and B a 1x1 conv; on embeddings A is a lookup table (r, num_embeddings) and B
(dim, r). DoRA's m is per output channel (per embedding dimension) and, on convolutions,
shaped (1, out, 1[, 1]) as PEFT stores it.

On a grouped convolution (groups = G > 1) A still sees every input channel and B is a
grouped 1x1 conv, (out, r / G, 1, 1): PEFT's layout. The dense update that makes cannot
live in the grouped kernel, so such an adapter is never merged; it has no DoRA either.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.config import (
    AdapterConfig,
    check_choice,
    check_number,
    check_patterns,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.layers import (
    CONV1D,
    CONV2D,
    CONVS,
    EMBEDDING,
    LINEAR,
    NN_CONV1D,
    AdapterLayer,
)
from lora_cli.adapters.registry import AdapterMethod, register_method
from lora_cli.errors import Problem, TargetingError, UserInputError

INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_[N]", "olora", "orthogonal")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings, with PEFT's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update; higher captures more, costs more memory and compute."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """The base stores weights as (in, out); set automatically for GPT-2's Conv1D."""
    bias: str = "none"
    """Which biases train too: "none", "all", or "lora_only" (those of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r); keeps large ranks learning."""
    init_lora_weights: bool | str = True
    """True (B=0), False (random, non-zero delta), "gaussian", "pissa", "pissa_niter_N", "olora", "orthogonal"."""
    use_dora: bool = False
    """Weight-decomposed LoRA: learn a magnitude per output row."""
    lora_bias: bool = False
    """A trainable bias on lora_B (not supported)."""

    def problems(self) -> list[Problem]:
        out = super().problems()
        out += check_positive_int("r", self.r)
        out += check_number("lora_alpha", self.lora_alpha)
        out += check_rate("lora_dropout", self.lora_dropout)
        out += check_choice("bias", self.bias, BIAS_CHOICES)
        out += check_patterns(self)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in INIT_CHOICES or fn.parse_pissa_niter(init) is not None):
            shown = ", ".join(repr(c) for c in INIT_CHOICES)
            out.append(Problem("init_lora_weights", f"must be one of {shown}", init))
        elif init == "orthogonal" and isinstance(self.r, int) and self.r % 2:
            out.append(Problem("init_lora_weights", "'orthogonal' needs an even r", init, hint=f"r is {self.r}"))
        if self.lora_bias:
            out.append(Problem("lora_bias", "is not supported by loracli", True, hint="set lora_bias: false"))
        return out


def dropout_rescale_folded(x: Tensor, dropout: nn.Module, scaling: float) -> tuple[Tensor, float]:
    """``dropout(x)`` without its 1 / (1 - p) rescale, and ``scaling`` that carries it instead.

    LoRA's dropped input only feeds linear maps, so mask * x / (1 - p) through A and s B equals
    mask * x through A and (s / (1 - p)) B: the rescale lands on the tiny B, not on x.
    On CPU the keep-mask comes from raw 64-bit random words, two 32-bit uniforms each, kept
    when >= a threshold (P(keep) = 1 - p to within 2**-32): about 3x cheaper than the
    ``bernoulli_`` behind F.dropout (see bench/README.md).
    """
    if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return x, scaling
    p = dropout.p
    if x.device.type != "cpu" or p >= 1:
        return dropout(x), scaling
    n = x.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)
    keep = words.view(torch.int32)[:n].view(x.shape) >= round(p * 2**32) - 2**31
    return x * keep.to(x.dtype), scaling / (1 - p)


def add_low_rank(result: Tensor, h: Tensor, b: Tensor) -> Tensor:
    """``result + h @ b.T`` as one addmm, without a full-size temporary, when dtypes agree."""
    if result.dtype != h.dtype:
        return result + F.linear(h, b).to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.T)
    return out.view(result.shape)


class LoraLayer(AdapterLayer):
    supported_kinds = (LINEAR, CONV1D, NN_CONV1D, CONV2D, EMBEDDING)
    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    disk_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._dora_norm: dict[str, Tensor] = {}  # row norms at merge time, to unmerge DoRA

    def extra_repr_for(self, name: str) -> str:
        dora = ", dora" if name in self.lora_magnitude_vector else ""
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}{dora}"

    @property
    def groups(self) -> int:
        """Groups of a convolution base layer; 1 for every other kind."""
        return self.base_layer.groups if self.kind in CONVS else 1

    # ------------------------------------------------------------------ params
    def add(self, name: str, config: LoraConfig, r: int, alpha: float) -> None:
        if self.groups > 1:
            where = f"{self.base_layer} (groups={self.groups})"
            if config.use_dora:
                raise TargetingError(
                    f"use_dora is not supported on grouped convolutions such as {where}; "
                    "set use_dora: false or exclude this module (exclude_modules)"
                )
            if r % self.groups:
                raise TargetingError(
                    f"LoRA on the grouped convolution {where} needs r divisible by groups, got r={r}; "
                    f"use a multiple of {self.groups} (rank_pattern can set it for this module alone) "
                    "or exclude this module"
                )
        self.r[name] = r
        self.scaling[name] = fn.lora_scaling(alpha, r, config.use_rslora)
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 and self.kind != EMBEDDING else nn.Identity()
        if self.kind == EMBEDDING:
            self.lora_embedding_A[name] = self.new_param(r, self.in_features)
            self.lora_embedding_B[name] = self.new_param(self.out_features, r)
        elif self.kind in CONVS:
            base = self.base_layer
            kernel = base.kernel_size
            if any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
                warnings.warn(
                    f"LoRA on {base}: A runs with this conv's dilation and padding mode, so merging is "
                    "exact, but PEFT runs A undilated with zero padding: the same adapter file gives "
                    "different outputs in PEFT",
                    stacklevel=2,
                )
            self.lora_A[name] = self.new_param(r, self.in_features, *kernel)  # (r, in, *kernel)
            self.lora_B[name] = self.new_param(self.out_features, r // self.groups, *[1] * len(kernel))
        else:
            self.lora_A[name] = self.new_param(r, self.in_features)
            self.lora_B[name] = self.new_param(self.out_features, r)
        self._init(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                norm = fn.row_norm(self.canonical_weight().float() + self.get_delta_weight(name).float())
            shape = (1, -1, *[1] * (self.base_layer.weight.dim() - 2)) if self.kind in CONVS else (-1,)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(shape).to(self.adapter_dtype()))

    @torch.no_grad()
    def _init(self, name: str, init: bool | str) -> None:
        if self.kind == EMBEDDING:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            nn.init.normal_(a) if init is False else nn.init.zeros_(a)
            nn.init.normal_(b)
            return
        a, b = self.lora_A[name], self.lora_B[name]
        r, s = self.r[name], self.scaling[name]
        niter = fn.parse_pissa_niter(init)
        if init in ("pissa", "olora") or niter is not None:
            weight = self.canonical_weight()
            if weight.dim() != 2:
                raise TargetingError(
                    f"init_lora_weights={init!r} supports Linear and GPT-2 Conv1D layers only, "
                    f"not {type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
                )
            if init == "olora":
                fa, fb = fn.olora_factors(weight, r)
            else:
                fa, fb = fn.pissa_factors(weight, r, s, niter)
            a.copy_(fa)
            b.copy_(fb)
            residual = weight.float() - s * (fb @ fa)
            self.base_layer.weight.data.copy_(self.to_raw(residual).to(weight.dtype))
        elif init == "orthogonal":
            if a.dim() != 2:  # PEFT refuses it on convolutions too
                raise TargetingError(
                    f"init_lora_weights='orthogonal' supports Linear and GPT-2 Conv1D layers only, not "
                    f"{type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
                )
            fa, fb = fn.orthogonal_factors(self.in_features, self.out_features, r)
            a.copy_(fa)
            b.copy_(fb)
        else:
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    # -------------------------------------------------------------------- math
    def get_delta_weight(self, name: str) -> Tensor:
        if self.groups > 1:
            raise UserInputError(
                f"a LoRA adapter on the grouped convolution {self.base_layer} cannot be merged: its A mixes "
                "all input channels, which a grouped kernel cannot hold (PEFT cannot merge it either); "
                "use the adapter unmerged, or train it without this module (exclude_modules)"
            )
        s = self.scaling[name]
        if self.kind == EMBEDDING:
            return fn.lora_delta(self.lora_embedding_A[name], self.lora_embedding_B[name], s)
        return fn.lora_delta(self.lora_A[name], self.lora_B[name], s)

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_layer(x)
        for name in names:
            if self.kind == EMBEDDING:
                result = self._embedding_forward(x, result, name)
                continue
            a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            dropout = self.lora_dropout[name]
            if name in self.lora_magnitude_vector:
                result = self._dora_forward(x, dropout(x.to(a.dtype)), result, name, dropout)
                continue
            xd, s = dropout_rescale_folded(x.to(a.dtype), dropout, s)
            if self.kind in CONVS:
                result = result + self._low_rank(xd, a, b * s).to(result.dtype)
            else:
                # (..., in) @ A.T -> (..., r) @ (s B).T -> (..., out): scaling folded into tiny B
                result = add_low_rank(result, F.linear(xd, a), b * s)
        return result

    def _low_rank(self, xd: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """B(A(xd)) for Linear/Conv1D and for convolutions (A: the base's kernel, stride,
        padding and dilation over all input channels; B: 1x1, grouped like the base)."""
        if self.kind not in CONVS:
            return F.linear(F.linear(xd, a), b)
        base = self.base_layer
        padding = base.padding
        if base.padding_mode != "zeros":
            xd = F.pad(xd, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        h = fn.conv(xd, a, stride=base.stride, padding=padding, dilation=base.dilation)
        return fn.conv(h, b, groups=base.groups)

    def _dora_scale(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """g = m / ||W + s B A|| per output row (out,), the norm detached (DoRA, section 4.3)."""
        weight = self.canonical_weight().to(a.dtype)
        norm = fn.row_norm(weight + fn.lora_delta(a, b, self.scaling[name])).detach()
        return self.lora_magnitude_vector[name].reshape(-1) / norm

    def _embedding_forward(self, x: Tensor, result: Tensor, name: str) -> Tensor:
        a, b, s = self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
        base = self.base_layer
        h = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        update = h @ (b * s).T  # (..., dim)
        if name in self.lora_magnitude_vector:
            g = self._dora_scale(name, a, b)  # (dim,)
            return (g * (result.to(a.dtype) + update)).to(result.dtype)
        return result + update.to(result.dtype)

    def _dora_forward(self, x: Tensor, xd: Tensor, result: Tensor, name: str, dropout: nn.Module) -> Tensor:
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        g = self._dora_scale(name, a, b)
        channel = (-1, *[1] * (self.base_layer.weight.dim() - 2)) if self.kind in CONVS else (-1,)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_x = result if bias is None else result - bias.view(channel)
        elif self.kind in CONVS:
            base_x = self.base_layer._conv_forward(xd, self.base_layer.weight.to(a.dtype), None)
        else:
            base_x = F.linear(xd, self.canonical_weight().to(a.dtype))
        g = g.view(channel)
        update = (g - 1) * base_x.to(a.dtype) + g * self._low_rank(xd, a, b * s)
        return result + update.to(result.dtype)

    # ------------------------------------------------------- DoRA-aware merging
    @torch.no_grad()
    def merge_one(self, name: str, safe_merge: bool) -> None:
        if name not in self.lora_magnitude_vector:
            return super().merge_one(name, safe_merge)
        weight = self.canonical_weight()
        adapted = weight.float() + self.get_delta_weight(name).float()
        norm = fn.row_norm(adapted)
        g = self.lora_magnitude_vector[name].float().reshape(-1) / norm
        new = adapted * g.view(-1, *[1] * (adapted.dim() - 1))
        self._dora_norm[name] = norm
        self._write_weight(self.to_raw(new).to(weight.dtype), name, safe_merge)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super().unmerge_one(name)
        weight = self.canonical_weight()
        g = self.lora_magnitude_vector[name].float().reshape(-1) / self._dora_norm.pop(name)
        old = weight.float() / g.view(-1, *[1] * (weight.dim() - 1)) - self.get_delta_weight(name).float()
        self.base_layer.weight.data.copy_(self.to_raw(old).to(weight.dtype))


register_method(AdapterMethod(name="lora", peft_type="LORA", config_cls=LoraConfig, layer_cls=LoraLayer, prefix="lora_"))
