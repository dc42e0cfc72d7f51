"""LoftQ (Li et al., arXiv:2310.08659): a quantized base plus a low-rank start that absorbs
the quantization error. Torch only; runs on a CPU.

    Q_0 = quant(W);  for t = 1..T:  L R = rank-r SVD of (W - Q_{t-1});  Q_t = quant(W - L R)
    base <- dequant(Q_T),  B = L (out, r),  A = R (r, in)

(the last iteration keeps its quantized weight and fits L R to W - Q_T). The factors are
set as they are, without dividing by the LoRA scaling, as PEFT does: with lora_alpha = r
the adapted layer starts at Q + B A ~ W.

Quantizers, chosen by ``loftq_bits`` (their math is in :mod:`lora_cli.adapters.quantized`):

- 4: NF4 (QLoRA's NormalFloat, arXiv:2305.14314) over blocks of 64 consecutive values of the
  flattened weight, each scaled by its absolute maximum, every value rounded to the nearest
  of the 16 levels below: what bitsandbytes' ``quantize_4bit(quant_type="nf4")`` and PEFT
  0.21's LoftQ do;
- 2: NF2, the same scheme with 4 levels from the normal quantiles, as PEFT's own torch
  quantizer did up to 0.19 (bitsandbytes has no 2-bit type, PEFT 0.20+ dropped it);
- 8: LLM.int8()'s row-wise absmax int8 (round(W * 127 / max|row|)) computed from W in
  float16, as bitsandbytes' ``Int8Params`` (PEFT 0.21's 8-bit LoftQ) does.

The adapter's base weights become the dequantized values (they are what a quantized base
would compute with): a run records them so that it reloads on the original base (see
:mod:`lora_cli.adapters.methods.lora.base_rewrites`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_cli.adapters.methods.lora.starts import LOFTQ_BITS, find
from lora_cli.adapters.quantized import int8_dequantized, nf_dequantized

if TYPE_CHECKING:
    from lora_cli.adapters.methods.lora.config import LoraConfig
    from lora_cli.adapters.methods.lora.layer import LoraLayer


def dequantized(weight: Tensor, bits: int) -> Tensor:
    """What a ``bits``-bit LoftQ base computes with in place of ``weight`` (float32)."""
    if bits == 8:
        return int8_dequantized(weight)
    if bits in (2, 4):
        return nf_dequantized(weight, bits)
    raise ValueError(f"loftq_bits must be one of {LOFTQ_BITS}, got {bits!r}")


@torch.no_grad()
def loftq_factors(weight: Tensor, bits: int, r: int, num_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ's alternating fit of W (out, in): (dequantized base (W's dtype), A (r, in), B (out, r)).

    The rank-r fit is the truncated SVD, split evenly: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.
    """
    if num_iter < 1:
        raise ValueError(f"loftq_iter must be >= 1, got {num_iter}")
    w = weight.float()
    residual = w
    for step in range(num_iter):
        q = dequantized(residual, bits)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(s[:r])
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if step + 1 < num_iter:
            residual = w - b @ a
    return q.to(weight.dtype), a, b


@torch.no_grad()
def init_loftq(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """W <- its dequantized values Q; A, B the low-rank fit of W - Q (recorded: W changes, and not by a low rank)."""
    settings = find("loftq").settings_of(config)
    q, fa, fb = loftq_factors(layer.canonical_weight(), settings["loftq_bits"], layer.r[name], settings["loftq_iter"])
    a, b = layer.factors(name)
    a.copy_(fa)
    b.copy_(fb)
    layer.base_weight().data.copy_(layer.to_raw(q))
    layer.record_base_weight(name, layer.base_weight())
