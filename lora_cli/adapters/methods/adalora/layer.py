"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., arXiv:2303.10512).

    y = W x + B (A * E) x * alpha / (ranknum + 1e-5)      A: (r, in), E: (r, 1), B: (out, r)

The update is kept in SVD form, P diag(E) Q, so a rank is removed by zeroing one
"singular value" E_i. Every module starts at rank ``init_r`` (ranknum stays ``init_r``,
also after pruning). During training the allocator scores every rank triplet

    I = |p * grad p|,  Ibar <- b1 Ibar + (1 - b1) I,  U <- b2 U + (1 - b2) |I - Ibar|
    score_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki),   s = Ibar * U

and zeroes the lowest-scored E entries until the total rank meets a budget that falls
cubically from ``init_r * n`` to ``target_r * n`` between steps ``tinit`` and
``total_step - tfinal``; the final mask is then frozen. A penalty
``orth_reg_weight * mean ||P P^T - I||_F`` over all A (rows) and B (columns) keeps P and Q
near-orthogonal. Saved adapters hold the kept ranks only, plus the mask as ``rank_pattern``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import CONV2D, HF_CONV1D, LINEAR
from lora_cli.adapters.layers import AdapterLayer, layer_kind
from lora_cli.errors import AdapterStateError

if TYPE_CHECKING:
    from lora_cli.adapters.methods.adalora.config import AdaLoraConfig


class AdaLoraLayer(AdapterLayer):
    """On a Conv2d, A is (r, in * kh * kw) and the delta is laid out as the kernel (PEFT's
    layout); it runs as a conv of dropout(x) with the base's stride, padding and dilation."""

    supported_kinds = (LINEAR, HF_CONV1D, CONV2D)
    adapter_attrs = ("lora_A", "lora_B", "lora_E")

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        if layer_kind(module) == CONV2D and module.groups > 1:
            return (
                f"AdaLoRA cannot adapt a grouped convolution (groups={module.groups}): its A spans all input "
                "channels, which no grouped kernel holds (PEFT 0.21 creates it and then fails in forward); "
                "use LoRA, LoHa or LoKr for it, or leave it out"
            )
        return super().refusal(module)

    @property
    def fan_in(self) -> int:
        """Columns of A: in_features, or in_channels * kh * kw on a Conv2d."""
        return self.canonical_weight()[0].numel()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.ranknum = nn.ParameterDict()  # frozen (1,) per adapter; a tensor so forward matches PEFT bit for bit
        self.scaling: dict[str, float] = {}

    def extra_repr_for(self, name: str) -> str:
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}"

    def add(self, name: str, config: AdaLoraConfig, r: int, alpha: float) -> None:
        r, alpha = config.init_r, config.lora_alpha  # PEFT ignores r, rank_pattern and alpha_pattern here
        self.r[name] = r
        self.scaling[name] = alpha if alpha > 0 else float(r)
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A[name] = self.new_param(r, self.fan_in)
        self.lora_E[name] = self.new_param(r, 1)
        self.lora_B[name] = self.new_param(self.out_features, r)
        ranknum = self.new_param(1).requires_grad_(False)
        self.ranknum[name] = ranknum
        with torch.no_grad():
            ranknum.fill_(float(r))
            for attr in self.adapter_attrs:
                param = getattr(self, attr)[name]
                if config.init_lora_weights is False:
                    nn.init.normal_(param)
                elif attr == "lora_E":
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02)

    @torch.no_grad()
    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep only the ranks where ``keep`` is True (ranknum, the scale, is unchanged)."""
        k = sum(keep)
        if self.r[name] == k:
            return
        if self.r[name] != len(keep):
            raise AdapterStateError(f"rank_pattern has {len(keep)} entries for a module of rank {self.r[name]}")
        idx = torch.tensor(keep, dtype=torch.bool, device=self.lora_E[name].device)
        for attr, shape, dim in (("lora_A", (k, self.fan_in), 0), ("lora_E", (k, 1), 0),
                                 ("lora_B", (self.out_features, k), 1)):
            old = getattr(self, attr)[name]
            new = self.new_param(*shape).requires_grad_(old.requires_grad)
            new.copy_(old[idx] if dim == 0 else old[:, idx])
            getattr(self, attr)[name] = new
        self.r[name] = k

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.ranknum:
            del self.ranknum[name]

    def get_delta_weight(self, name: str) -> Tensor:
        delta = fn.adalora_delta(self.lora_A[name], self.lora_B[name], self.lora_E[name], self.scaling[name],
                                 self.ranknum[name])
        return delta.reshape(self.canonical_weight().shape)

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_layer(x)
        if self.kind == CONV2D:
            for name in names:
                xd = self.lora_dropout[name](x.to(self.lora_A[name].dtype))
                result = result + self.base_layer._conv_forward(xd, self.get_delta_weight(name), None).to(result.dtype)
            return result
        for name in names:
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = self.lora_dropout[name](x.to(a.dtype)) @ (a * e).T @ b.T  # (..., out)
            result = result + (h * self.scaling[name] / (self.ranknum[name] + 1e-5)).to(result.dtype)
        return result

