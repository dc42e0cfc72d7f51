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

import torch
from torch import Tensor

from lora_cli.adapters import functional as fn
from lora_cli.adapters.methods.lycoris.config import LoHaConfig
from lora_cli.adapters.methods.lycoris.layer import LycorisLayer


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
        self.kaiming_init(name)
        if config.init_weights:
            with torch.no_grad():
                self.hada_w2_b[name].zero_()

    def get_delta_weight(self, name: str) -> Tensor:
        w1_a, w1_b, w2_a, w2_b = (getattr(self, f"hada_w{k}")[name] for k in ("1_a", "1_b", "2_a", "2_b"))
        if name in self.hada_t1:
            t1, t2 = self.hada_t1[name], self.hada_t2[name]
            delta = fn.loha_delta_cp(t1, w1_a, w1_b, t2, w2_a, w2_b, self.scaling[name])
        else:
            delta = fn.loha_delta(w1_a, w1_b, w2_a, w2_b, self.scaling[name])
        return delta.reshape(self.canonical_weight().shape)

