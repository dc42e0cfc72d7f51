"""The starts that need one layer only: ``f(layer, adapter_name, config)`` sets A and B (and, for
PiSSA and OLoRA, the base weight) of a :class:`~lora_cli.adapters.methods.lora.layer.LoraLayer`
whose A and B were just made. Which start runs where is the table in
:mod:`lora_cli.adapters.methods.lora.starts`; MiCA's and LoftQ's are in their own modules.

    plain        A kaiming-uniform (gaussian: normal, std 1/r), B = 0; init False: B random too
                 embedding: A = 0 (init False: normal), B normal
    pissa        A, B = the top-r singular triplets of W, split as sqrt(S);  W <- W - s B A
    olora        A, B = the QR factors of W's first r columns;               W <- W - s B A
    orthogonal   A, B from orthogonal halves of one random basis: B A = 0, both non-zero
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import EMBEDDING
from lora_cli.adapters.methods.lora.starts import parse_pissa_niter

if TYPE_CHECKING:
    from lora_cli.adapters.methods.lora.config import LoraConfig
    from lora_cli.adapters.methods.lora.layer import LoraLayer


@torch.no_grad()
def plain(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """True, False and gaussian; also the zero update a calibration pass (EVA, CorDA, LoRA-GA)
    starts from, which is what PEFT builds when it loads such an adapter without data."""
    init = config.init_lora_weights
    if layer.kind == EMBEDDING:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        nn.init.normal_(a) if init is False else nn.init.zeros_(a)
        nn.init.normal_(b)
        return
    a, b = layer.lora_A[name], layer.lora_B[name]
    fn.random_init(a, b, init, layer.r[name])
    if name in layer.lora_B_bias:  # as nn.Linear draws a bias for B's fan-in; zero for a zero delta
        bound = 1 / math.sqrt(b[0].numel()) if init is False else 0.0
        nn.init.uniform_(layer.lora_B_bias[name], -bound, bound)


@torch.no_grad()
def pissa(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """PiSSA (arXiv:2404.02948); ``pissa_niter_N`` takes a randomised SVD of N iterations."""
    weight = layer.canonical_weight()
    niter = parse_pissa_niter(config.init_lora_weights)
    _rewrite(layer, name, weight, *fn.pissa_factors(weight, layer.r[name], layer.scaling[name], niter))


@torch.no_grad()
def olora(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """OLoRA (arXiv:2406.01775)."""
    weight = layer.canonical_weight()
    _rewrite(layer, name, weight, *fn.olora_factors(weight, layer.r[name]))


def _rewrite(layer: LoraLayer, name: str, weight: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> None:
    """A, B <- ``fa``, ``fb``; W <- W - s B A, recorded so the adapter saves for the original base."""
    layer.lora_A[name].copy_(fa)
    layer.lora_B[name].copy_(fb)
    layer.base_weight().data.copy_(layer.to_raw(fn.low_rank_residual(weight, fa, fb, layer.scaling[name])))
    layer.record_base_rewrite(name, fa, fb)


@torch.no_grad()
def orthogonal(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """Both factors non-zero, the update zero: training moves both from the first step."""
    fa, fb = fn.orthogonal_factors(layer.in_features, layer.out_features, layer.r[name])
    layer.lora_A[name].copy_(fa)
    layer.lora_B[name].copy_(fb)
