"""LoRA: low-rank adaptation (Hu et al., arXiv:2106.09685), with rsLoRA and DoRA.

    y = W x + s * B (A (dropout(x)))        A: (r, in), B: (out, r), s = alpha / r

rsLoRA (arXiv:2312.03732) uses s = alpha / sqrt(r). DoRA (``use_dora``) is a variant
object the layer calls to create, merge, unmerge and run such an adapter: see
:mod:`lora_cli.adapters.methods.lora.dora`. How A and B start
(``init_lora_weights``) is :mod:`lora_cli.adapters.methods.lora.starts`' table.

On convolutions (``nn.Conv1d``, ``nn.Conv2d``) A is a conv with the base kernel/stride/
padding and B a 1x1 conv; on embeddings A is a lookup table (r, num_embeddings) and B
(dim, r).

On a grouped convolution (groups = G > 1) A still sees every input channel and B is a
grouped 1x1 conv, (out, r / G, 1, 1): PEFT's layout. The dense update that makes cannot
live in the grouped kernel, so such an adapter is never merged (DoRA included).

``lora_bias``: lora_B gets a bias b (out,), y = W x + s (B A x + b); merging adds s b to
the base bias (a base without a bias cannot merge it). ``nn.MultiheadAttention`` has its
own layer: :mod:`lora_cli.adapters.methods.lora.mha`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import (
    CONV2D,
    CONV3D,
    CONVS,
    EMBEDDING,
    HF_CONV1D,
    LINEAR,
    TORCH_CONV1D,
)
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.methods.lora import starts
from lora_cli.adapters.methods.lora.dora import DoraVariant, LoraVariant
from lora_cli.errors import LoraCliError, TargetingError, UserInputError

if TYPE_CHECKING:
    from lora_cli.adapters.methods.lora.config import LoraConfig


class LoraLayer(AdapterLayer):
    supported_kinds = (LINEAR, HF_CONV1D, TORCH_CONV1D, CONV2D, CONV3D, EMBEDDING)
    wraps_quantized = True  # bitsandbytes Linear4bit / Linear8bitLt: base run as is, A and B in float32
    adapter_attrs = (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_B_bias"
    )
    disk_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"}
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, LoraVariant] = {}  # adapters with a variant (DoRA) only
        self.base_rewrites: dict[str, dict[str, Tensor]] = {}
        """Per adapter, how its init rewrote the base weight (``record_base_rewrite``)."""

    def extra_repr_for(self, name: str) -> str:
        dora = ", dora" if isinstance(self.lora_variant.get(name), DoraVariant) else ""
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}{dora}"

    @property
    def groups(self) -> int:
        """Groups of a convolution base layer; 1 for every other kind."""
        return self.base_layer.groups if self.kind in CONVS else 1

    # ------------------------------------------------------------------ params
    def add(self, name: str, config: LoraConfig, r: int, alpha: float) -> None:
        init = config.init_lora_weights
        start = starts.find(init)
        if self.quant_kind is not None and start.rewrites_base:  # writing a 4-bit / 8-bit weight is impossible
            raise TargetingError(
                f"init_lora_weights={init!r} rewrites the base weight, which is bitsandbytes-quantized here "
                f"({type(self.base_layer).__name__}); use init_lora_weights: true, gaussian or orthogonal with "
                "model.quantization, or remove model.quantization (loftq quantizes a full-precision base itself)"
            )
        if config.lora_bias and self.kind == EMBEDDING:
            raise TargetingError(
                f"lora_bias is not supported on the embedding {self.base_layer} (PEFT refuses it too); "
                "set lora_bias: false or exclude this module (exclude_modules)"
            )
        if self.groups > 1:
            where = f"{self.base_layer} (groups={self.groups})"
            if r % self.groups:
                raise TargetingError(
                    f"LoRA on the grouped convolution {where} needs r divisible by groups, got r={r}; "
                    f"use a multiple of {self.groups} (rank_pattern can set it for this module alone) "
                    "or exclude this module"
                )
        refused = start.refusal(init, self.kind, type(self.base_layer).__name__)
        if refused:
            raise TargetingError(refused)
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
        if config.lora_bias:
            self.lora_B_bias[name] = self.new_param(self.out_features)
        start.layer_function(self.kind)(self, name, config)
        if config.use_dora:
            self.lora_variant[name] = DoraVariant()
            self.lora_variant[name].init(self, name)

    # ------------------------------------------------ base weights an init rewrote
    def record_base_rewrite(self, name: str, lora_a: Tensor, lora_b: Tensor) -> None:
        """Note that adapter ``name``'s init set this layer's base weight to
        ``fn.low_rank_residual(W, lora_a, lora_b, s)`` = W - s B0 A0 (PiSSA, OLoRA, CorDA,
        LoRA-GA). Call it right after rewriting, with the A0 (r, in) and B0 (out, r) used.

        With the record, the trained adapter can be saved relative to the original W
        (rank 2r: [A; A0], [B, -B0]) and a resumed run can rebuild W - s B0 A0 bit for bit
        without the init: see :mod:`lora_cli.adapters.methods.lora.base_rewrites`."""
        self.base_rewrites[name] = {"lora_A": lora_a.detach().to("cpu", copy=True),
                                    "lora_B": lora_b.detach().to("cpu", copy=True)}

    def record_base_weight(self, name: str, weight: Tensor) -> None:
        """Note that adapter ``name``'s init replaced this layer's base weight by ``weight``
        (as stored, e.g. (in, out) for GPT-2's Conv1D), a change that is not low rank (LoftQ's
        dequantized weights): saving then writes the weight itself beside the adapter."""
        self.base_rewrites[name] = {"weight": weight.detach().to("cpu", copy=True)}

    # -------------------------------------------------------------------- math
    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """A and B of adapter ``name``: ``lora_embedding_A`` / ``_B`` on an embedding."""
        if self.kind == EMBEDDING:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name], self.lora_B[name]

    def get_delta_weight(self, name: str) -> Tensor:
        if self.groups > 1:
            raise UserInputError(
                f"a LoRA adapter on the grouped convolution {self.base_layer} cannot be merged: its A mixes "
                "all input channels, which a grouped kernel cannot hold (PEFT cannot merge it either); "
                "use the adapter unmerged, or train it without this module (exclude_modules)"
            )
        return fn.lora_delta(*self.factors(name), self.scaling[name])

    def dora_delta(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """The s B A that DoRA's norm ||W + s B A|| uses: the delta, or on a grouped conv,
        where no dense delta fits the kernel, PEFT 0.21's reading of B and A (see
        ``fn.grouped_lora_weight``), so that DoRA files mean the same in both tools."""
        if self.groups > 1:
            return fn.grouped_lora_weight(a, b, self.base_weight().shape) * self.scaling[name]
        return fn.lora_delta(a, b, self.scaling[name])

    def bias_update(self, name: str, like: Tensor) -> Tensor | None:
        """s b, shaped to add to an output like ``like`` (channel dim 1 on convs), or None."""
        if name not in self.lora_B_bias:
            return None
        bias = self.lora_B_bias[name] * self.scaling[name]
        return bias.view(-1, *[1] * (like.dim() - 2)) if self.kind in CONVS else bias

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_layer(x)
        for name in names:
            variant = self.lora_variant.get(name)
            result = self.add_update(result, x, name) if variant is None else variant.forward(self, name, x, result)
        return result

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        dora = [n for n in names if n in self.lora_variant]
        return f"DoRA adapters {dora} have no per-row forward (PEFT refuses them too)" if dora else None

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result`` + s B A x (+ s b) of plain LoRA adapter ``name``."""
        if self.kind == EMBEDDING:
            return result + self.embedding_update(x, name).to(result.dtype)
        a, b = self.lora_A[name], self.lora_B[name]
        xd, s = fn.dropout_rescale_folded(x.to(a.dtype), self.lora_dropout[name], self.scaling[name])
        if self.kind in CONVS:
            result = result + self.low_rank(xd, a, b * s).to(result.dtype)
        else:
            # (..., in) @ A.T -> (..., r) @ (s B).T -> (..., out): scaling folded into tiny B
            result = fn.add_low_rank(result, F.linear(xd, a), b * s)
        bias = self.bias_update(name, result)
        return result if bias is None else result + bias.to(result.dtype)

    def low_rank(self, xd: Tensor, a: Tensor, b: Tensor) -> Tensor:
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

    def embedding_update(self, x: Tensor, name: str) -> Tensor:
        """s B A[x] for token ids ``x``: (..., dim), in the adapter's dtype."""
        a, b = self.factors(name)
        base = self.base_layer
        h = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return h @ (b * self.scaling[name]).T

    # ---------------------------------------------------- merging with a variant
    def unmerged_weight(self, merged: list[str] | None = None) -> Tensor:
        """The canonical base weight without the adapters ``merged`` (default: those merged
        now), which DoRA's norm and DoRA's ``W x`` need. With nothing merged it is the weight
        itself; else float32, solved from the merged weight ``alpha * W + offset`` (each
        merged adapter says how it changed alpha and offset), so no copy of W is kept."""
        weight = self.canonical_weight()
        merged = self.merged_adapters if merged is None else merged
        if not merged:
            return weight
        weight = weight.float()
        alpha = torch.ones(weight.shape[0], *[1] * (weight.dim() - 1), device=weight.device)
        offset = torch.zeros_like(weight)
        for name in merged:
            delta = self.get_delta_weight(name).float()
            variant = self.lora_variant.get(name)
            if variant is None:
                offset = offset + delta
            else:
                alpha, offset = variant.merged_form(self, name, alpha, offset, delta)
        return (weight - offset) / alpha

    def merge_targets(self) -> list[Tensor]:
        bias = getattr(self.base_layer, "bias", None)
        return super().merge_targets() + ([bias] if len(self.lora_B_bias) and bias is not None else [])

    @torch.no_grad()
    def merge_one(self, name: str, safe_merge: bool) -> None:
        variant = self.lora_variant.get(name)
        if name in self.lora_B_bias:
            self._merge_bias(name, safe_merge, sign=1)
        if variant is None:
            return super().merge_one(name, safe_merge)
        weight = self.canonical_weight()
        new = variant.merge_safe(self, name, weight)
        self._write_weight(self.to_raw(new).to(weight.dtype), name, safe_merge)

    @torch.no_grad()
    def _merge_bias(self, name: str, safe_merge: bool, sign: int) -> None:
        """Add (sign 1) or subtract s b from the base bias; checked before the weight moves."""
        bias = self.base_layer.bias
        if bias is None:
            raise LoraCliError(
                f"adapter {name!r} has a lora_bias, but {self.base_layer} has no bias to merge it into; "
                "use the adapter unmerged (PEFT cannot merge it either), or train it with lora_bias: false"
            )
        self.get_delta_weight(name)  # refuses grouped convs before anything is written
        new = bias + sign * (self.lora_B_bias[name] * self.scaling[name]).to(bias.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise LoraCliError(f"merging adapter {name!r} would put NaN/inf into the bias; nothing was merged")
        bias.copy_(new)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        variant = self.lora_variant.get(name)
        if name in self.lora_B_bias:
            self._merge_bias(name, False, sign=-1)
        if variant is None:
            return super().unmerge_one(name)
        weight = self.canonical_weight()
        old = variant.unmerge(self, name, weight)
        self.base_weight().data.copy_(self.to_raw(old).to(weight.dtype))

