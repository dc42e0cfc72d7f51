"""LoRA on ``nn.MultiheadAttention``, laid out as PEFT 0.21 lays it out.

    in_proj_weight' = W_in + s B A               A: (r, dim), B: (3 * dim, r)
    out_proj.weight' = W_out + 2 s B_o A_o       A_o: (r, dim), B_o: (dim, r)

The attention's forward reads ``in_proj_weight`` and ``out_proj.weight`` itself (it never
calls ``out_proj``), so this layer runs the attention with the adapted tensors swapped in
(``torch.func.functional_call``), and gradients flow to A and B through them. ``out_proj``
gets a LoRA layer of its own, inside the attention: file keys ``P.lora_A.weight`` /
``P.lora_B.weight`` for in_proj and ``P.base_layer.out_proj.lora_A.weight`` / ``...lora_B``
for out_proj.

PEFT 0.21 applies the out_proj update twice, in its forward as in merging and in
``merge_and_unload``, with the gradient flowing through one copy only (measured, see
tests/adapters/test_lora_mha.py); adapter files from either tool mean that, so
:data:`PEFT_OUT_PROJ_FACTOR` keeps it. As in PEFT, lora_dropout
has no effect here (the update is folded into the weights), and there is no DoRA; the
attention needs one packed in_proj (kdim == vdim == embed_dim).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.kinds import LINEAR, MHA
from lora_cli.adapters.layers import layer_kind
from lora_cli.adapters.methods.lora.config import LoraConfig
from lora_cli.adapters.methods.lora.layer import LoraLayer
from lora_cli.errors import TargetingError

PEFT_OUT_PROJ_FACTOR = 2
"""How many times PEFT 0.21 adds out_proj's s B_o A_o to an attention's output projection."""


class MhaOutProjLayer(LoraLayer):
    """LoRA on an attention's out_proj; the attention's layer runs it, never its own forward."""

    supported_kinds = (LINEAR,)

    def get_delta_weight(self, name: str) -> Tensor:
        return super().get_delta_weight(name) * PEFT_OUT_PROJ_FACTOR

    def live_weight(self) -> Tensor:
        """out_proj's weight with every active, unmerged adapter added (what the attention uses).

        Each update counts PEFT_OUT_PROJ_FACTOR times, the gradient flowing through one (PEFT's).
        """
        weight = self.base_weight()
        names = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if self.disabled or not names:
            return weight
        once = sum(super(MhaOutProjLayer, self).get_delta_weight(n) for n in names)
        return weight + (once + (PEFT_OUT_PROJ_FACTOR - 1) * once.detach()).to(weight.dtype)


class LoraMhaLayer(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``: in_proj here, out_proj in a :class:`MhaOutProjLayer`."""

    supported_kinds = (MHA,)

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        return (
            "LoRA on nn.MultiheadAttention folds the update into the attention's weights, one adapter for "
            "the whole batch (PEFT refuses mixed batches here too); run one adapter at a time"
        )

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        if layer_kind(module) == MHA and not module._qkv_same_embed_dim:
            return (
                "LoRA adapts a MultiheadAttention only with one packed in_proj (kdim == vdim == embed_dim, "
                "as PEFT 0.21); leave it out, or adapt layers around it"
            )
        return super().refusal(module)

    def add(self, name: str, config: LoraConfig, r: int, alpha: float) -> None:
        where = f"{type(self.base_layer).__name__}(embed_dim={self.in_features})"
        for option, value in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)):
            if value:
                raise TargetingError(
                    f"{option} is not supported on {where} (PEFT 0.21 has no such layer either); "
                    f"set {option}: false or exclude this module (exclude_modules)"
                )
        if not isinstance(config.init_lora_weights, bool):
            raise TargetingError(
                f"init_lora_weights={config.init_lora_weights!r} is not supported on {where}; "
                "use init_lora_weights: true or exclude this module"
            )
        if config.lora_dropout:
            warnings.warn(
                f"lora_dropout has no effect on {where}: its update is folded into the attention's weights "
                "(as in PEFT 0.21)",
                stacklevel=3,
            )
        super().add(name, config, r, alpha)
        attention = self.base_layer
        if not isinstance(attention.out_proj, MhaOutProjLayer):
            attention.out_proj = MhaOutProjLayer(attention.out_proj)
        attention.out_proj.add(name, config, r, alpha)
        attention.out_proj.active_adapters = list(self.active_adapters)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """``nn.TransformerEncoderLayer`` reads this to choose its fused eval fast path, which
        takes the base weights straight from the attention and so would skip the adapter (it
        does in PEFT 0.21): False while an adapter is live turns that path off."""
        live = not self.disabled and any(n in self.r and n not in self.merged_adapters for n in self.active_adapters)
        return self.base_layer._qkv_same_embed_dim and not live

    def delete(self, name: str) -> None:
        super().delete(name)
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, MhaOutProjLayer) and name in out_proj.r:
            out_proj.delete(name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        attention = self.base_layer
        if self.disabled and self.merged_adapters:
            self.unmerge()
        names = [] if self.disabled else [
            n for n in self.active_adapters if n in self.r and n not in self.merged_adapters
        ]
        swapped: dict[str, Tensor] = {}
        if names:
            weight = self.base_weight()
            swapped["in_proj_weight"] = weight + sum(self.get_delta_weight(n) for n in names).to(weight.dtype)
        out_proj = attention.out_proj
        if isinstance(out_proj, MhaOutProjLayer):
            live = out_proj.live_weight()
            if live is not out_proj.base_weight():
                swapped["out_proj.base_layer.weight"] = live
        if not swapped:
            return attention(*args, **kwargs)
        return torch.func.functional_call(attention, swapped, args, kwargs)

