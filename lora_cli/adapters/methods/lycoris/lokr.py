"""LoKr: low-rank Kronecker product (LyCORIS, Yeh et al., arXiv:2309.14859).

    ΔW = kron(w1, w2) * alpha / r       w1: (out_l, in_m), w2: (out_k, in_n)

out = out_l * out_k and in = in_m * in_n are split by ``factorization`` (near sqrt, or
by ``decompose_factor``). w2 is itself low rank, w2_a (out_k, r) @ w2_b (r, in_n), when
r < max(out_k, in_n) / 2; w1 likewise only with ``decompose_both``. The scale is
alpha / r in every case (as PEFT does, even when no factor is low rank). On
convolutions w2 carries the kernel: (out_k, in_n, kh, kw), or a flattened low-rank
(out_k, r) @ (r, in_n * kh * kw), or a Tucker core t2 with ``use_effective_conv2d``.

``torch.nn.Conv1d`` follows PEFT 0.21 exactly, so that adapter files mean the same in
both tools. Low-rank w2 is flattened (out_k, r) @ (r, in_n * k) and t2 is stored
(r, r, k, 1); both give kron(w1, w2) laid out as the kernel. A full w2 (out_k, in_n, k)
is combined as kron(w1[None], w2), shape (out_k, out_l * in_n, in_m * k), then read as
(out, in, k): a fixed reshuffle of the Kronecker entries, not kron(w1, w2) per tap. It
trains like any linear parametrisation, and merging stays exact.

On Linear and Conv1D the forward never builds ΔW: with X the (in_m, in_n) view of an
input row, kron(w1, w2) vec(X) = vec(w1 X w2^T), two small matmuls (``kron_apply``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.kinds import CONVS, TORCH_CONV1D
from lora_cli.adapters.methods.lycoris.config import LoKrConfig
from lora_cli.adapters.methods.lycoris.layer import LycorisLayer


class LoKrLayer(LycorisLayer):
    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def add(self, name: str, config: LoKrConfig, r: int, alpha: float) -> None:
        self.add_common(name, config, r, alpha)
        out, fan_in, *kernel = self.canonical_weight().shape  # conv: in = in_channels // groups
        out_l, out_k = fn.factorization(out, config.decompose_factor)
        in_m, in_n = fn.factorization(fan_in, config.decompose_factor)
        if config.decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a[name], self.lokr_w1_b[name] = self.new_param(out_l, r), self.new_param(r, in_m)
        else:
            self.lokr_w1[name] = self.new_param(out_l, in_m)
        if r >= max(out_k, in_n) / 2:
            self.lokr_w2[name] = self.new_param(out_k, in_n, *kernel)
        elif (core := self.tucker_kernel(config)) is not None:
            self.lokr_t2[name] = self.new_param(r, r, *core)
            self.lokr_w2_a[name], self.lokr_w2_b[name] = self.new_param(r, out_k), self.new_param(r, in_n)
        else:
            self.lokr_w2_a[name] = self.new_param(out_k, r)
            self.lokr_w2_b[name] = self.new_param(r, in_n * math.prod(kernel))
        self.kaiming_init(name)
        with torch.no_grad():
            if config.init_weights is True:
                nn.init.zeros_(self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name])
            elif config.init_weights == "lycoris":
                nn.init.zeros_(self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_b[name])

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """w1 (out_l, in_m) and w2 (out_k, in_n[, *kernel]) or, flattened, (out_k, in_n * kernel size).

        A Tucker w2 is (out_k, in_n, kh, kw), or (out_k, in_n, k, 1) on a Conv1d.
        """
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = fn.tucker_weight(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
            # a copy with standard strides: the einsum gives a Conv1d's size-1 last dim stride
            # out_k * in_n * k, which .contiguous() keeps and torch.kron cannot view
            w2 = w2.clone(memory_format=torch.contiguous_format)
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def get_delta_weight(self, name: str) -> Tensor:
        w1, w2 = self.factors(name)
        if self.kind == TORCH_CONV1D and w2.dim() == 3:
            w1 = w1[None]  # PEFT's full-w2 Conv1d layout (module docstring)
        return fn.kron_delta(w1, w2, self.scaling[name]).reshape(self.canonical_weight().shape)

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        if self.kind in CONVS:
            return super().delta_forward(x, names)
        result = self.base_layer(x)
        for name in names:
            w1, w2 = self.factors(name)
            h = fn.kron_apply(x.to(w1.dtype), w1, w2, self.scaling[name])
            mask = self.row_mask(name, h)
            result = result + (h if mask is None else h * mask).to(result.dtype)
        return result

