"""DoRA: weight-decomposed low-rank adaptation (Liu et al., arXiv:2402.09353), a LoRA variant.

    W' = m * (W + s B A) / ||W + s B A||         per output row; m learned, starts at ||W + s B A||
    y  = W x + (g - 1) W x + g s B A x,          g = m / ||W + s B A||  (norm detached, section 4.3)

:class:`~lora_cli.adapters.methods.lora.layer.LoraLayer` owns A, B and the plain LoRA path; a
variant changes how one adapter is created (``init``), folded into and out of the base
weight (``merge_safe``, ``unmerge``) and run (``forward``).

Several active adapters compose in order, as in PEFT's forward: a DoRA adapter rescales
everything before it, ``W' = g (W_prev + s B A)``, while its ``g = m / ||W + s B A||`` is
always taken against the unmerged base W. Merging follows the same rule, so the merged
weight gives the unmerged output however many adapters it already holds
(``LoraLayer.unmerged_weight`` recovers W from a merged weight).

m is PEFT's ``lora_magnitude_vector``: (out,) on Linear, Conv1D and embeddings (one per embedding
dimension), (1, out, 1[, 1]) on convolutions, as PEFT stores it. On a grouped conv the
norm is taken of PEFT 0.21's reading of B and A (``LoraLayer.dora_delta``); such an
adapter runs unmerged only, as every LoRA on a grouped conv.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import CONVS, EMBEDDING

if TYPE_CHECKING:
    from lora_cli.adapters.methods.lora.layer import LoraLayer


class LoraVariant:
    """What a LoRA variant changes; one instance per adapter of a layer, so it may keep state."""

    def init(self, layer: LoraLayer, name: str) -> None:
        """Create the variant's parameters, after A and B exist and are initialised."""

    def merge_safe(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """The merged weight (canonical layout, float32) for the current ``weight``, which may
        already hold other merged adapters; writes nothing."""
        raise NotImplementedError

    def unmerge(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """The weight (canonical layout, float32) without this adapter, from the merged ``weight``."""
        raise NotImplementedError

    def merged_form(self, layer: LoraLayer, name: str, alpha: Tensor, offset: Tensor,
                    delta: Tensor) -> tuple[Tensor, Tensor]:
        """A weight ``alpha * W + offset`` (W the unmerged base, alpha per output row) after this
        merged adapter (delta ``delta``) went into it: how ``LoraLayer.unmerged_weight`` solves W."""
        raise NotImplementedError

    def forward(self, layer: LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor:
        """``result`` (the base output for ``x``) with adapter ``name`` applied."""
        raise NotImplementedError


class DoraVariant(LoraVariant):
    def __init__(self) -> None:
        self._scale: Tensor | None = None  # g per output row while merged, to unmerge exactly

    def init(self, layer: LoraLayer, name: str) -> None:
        with torch.no_grad():
            a, b = layer.factors(name)
            norm = fn.row_norm(layer.unmerged_weight().float() + layer.dora_delta(name, a, b).float())
        shape = (1, -1, *[1] * (layer.base_weight().dim() - 2)) if layer.kind in CONVS else (-1,)
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(shape).to(layer.adapter_dtype()))

    @staticmethod
    def scale(layer: LoraLayer, name: str, a: Tensor, b: Tensor) -> Tensor:
        """g = m / ||W + s B A|| per output row (out,), W the unmerged base, the norm detached."""
        weight = layer.unmerged_weight().to(a.dtype)
        norm = fn.row_norm(weight + layer.dora_delta(name, a, b)).detach()
        return layer.lora_magnitude_vector[name].reshape(-1) / norm

    def merge_safe(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        delta = layer.get_delta_weight(name).float()
        norm = fn.row_norm(layer.unmerged_weight().float() + delta)  # not of ``weight``: it may hold others
        g = (layer.lora_magnitude_vector[name].float().reshape(-1) / norm).view(-1, *[1] * (delta.dim() - 1))
        self._scale = g
        return g * (weight.float() + delta)

    def unmerge(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        g, self._scale = self._scale, None
        return weight.float() / g - layer.get_delta_weight(name).float()

    def merged_form(self, layer: LoraLayer, name: str, alpha: Tensor, offset: Tensor,
                    delta: Tensor) -> tuple[Tensor, Tensor]:
        return alpha * self._scale, self._scale * (offset + delta)

    def forward(self, layer: LoraLayer, name: str, x: Tensor, result: Tensor) -> Tensor:
        if layer.kind == EMBEDDING:
            a, b = layer.factors(name)
            update = layer.embedding_update(x, name)
            g = self.scale(layer, name, a, b)  # (dim,)
            return (g * (result.to(a.dtype) + update)).to(result.dtype)
        a, b, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        dropout = layer.lora_dropout[name]
        xd = dropout(x.to(a.dtype))
        g = self.scale(layer, name, a, b)
        base = layer.base_layer
        channel = (-1, *[1] * (base.weight.dim() - 2)) if layer.kind in CONVS else (-1,)
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_x = result if base.bias is None else result - base.bias.view(channel)  # W x, no second matmul
        elif layer.kind in CONVS:
            base_x = base._conv_forward(xd, base.weight.to(a.dtype), None)
        else:
            base_x = F.linear(xd, layer.canonical_weight().to(a.dtype))
        g = g.view(channel)
        update = (g - 1) * base_x.to(a.dtype) + g * layer.low_rank(xd, a, b * s)
        return result + update.to(result.dtype)
