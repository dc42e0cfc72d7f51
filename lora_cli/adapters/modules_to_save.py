"""The other wrapper a model gets besides adapter layers: a module trained in full (``modules_to_save``,
e.g. a new classifier head), one trainable copy per adapter and the original kept frozen."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.layers import rows_of
from lora_cli.errors import LoraCliError


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: one trainable copy per adapter, the original kept frozen
    for when adapters are disabled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.batch_adapters: list[str] | None = None
        """One adapter name per row while a mixed batch runs (set by the model), else None."""

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapters is None or self.disabled:
            return self.active_module()(*args, **kwargs)
        return self.rows_forward(self.batch_adapters, *args, **kwargs)

    def rows_forward(self, names: list[str], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Row ``i`` through adapter ``names[i]``'s trained copy, or the original module."""
        if x.shape[0] != len(names):
            raise LoraCliError(f"adapter_names has {len(names)} name(s) but a modules_to_save module got {x.shape[0]} row(s)")
        order, outs, copies = [], [], dict(self.modules_to_save.items())
        for name in dict.fromkeys(names):
            module = copies.get(name, self.original_module)
            idx = rows_of(names, name, x.device)
            outs.append(module(x.index_select(0, idx), *args, **kwargs))
            order.append(idx)
        return torch.cat(outs).index_select(0, torch.argsort(torch.cat(order)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)
