"""Several adapters at once: active together, or one per row of a batch (PEFT's behaviour).

    model.set_adapter(["a", "b"])                  # both deltas add up; both train
    model.eval()
    model(**inputs, adapter_names=["a", "__base__", "b"])   # row 0: a, row 1: none, row 2: b

Active together, every listed adapter adds its delta and trains (unless its config has
``inference_mode``); merging folds all of them in. A module in ``modules_to_save`` has one
copy per adapter and runs one, so two active adapters may not both have a copy of it
(PEFT refuses that too).

A mixed batch routes row ``i`` through adapter ``adapter_names[i]`` in every LoRA layer and
``modules_to_save`` copy, whichever adapters are active. As in PEFT it is refused in
training mode, while any adapter is merged, with DoRA adapters and on
``nn.MultiheadAttention``; other methods (LoHa, LoKr, AdaLoRA) are refused too (PEFT 0.21
ignores ``adapter_names`` for LoHa / LoKr, running every row through the active adapter).
With adapters disabled every row runs the base model, as in PEFT.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from lora_cli.errors import UserInputError

BASE_ADAPTER = "__base__"
"""The name in ``adapter_names`` for a row that gets no adapter (PEFT's)."""
BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x")
"""Keyword inputs whose first dimension is the batch, tried in this order."""


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in [*args, *(kwargs.get(k) for k in BATCH_KEYS), *kwargs.values()]:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class MultiAdapterMixin:
    """Activation of one or several adapters, what trains, and mixed-adapter batches, for
    :class:`lora_cli.adapters.model.AdapterModel`."""

    _active: list[str]

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in the order given to :meth:`set_adapter`."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (the one saving, AdaLoRA's steps and regularizer use)."""
        return self._active[0]

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or every name in a list) the active adapter(s): each adds its
        delta in forward, and only these train."""
        names = list(dict.fromkeys([adapter_name] if isinstance(adapter_name, str) else adapter_name))
        if not names:
            raise UserInputError("set_adapter needs at least one adapter name")
        for name in names:
            if name not in self.peft_config:
                raise UserInputError(f"no adapter named {name!r}; have {sorted(self.peft_config)}")
        if len(names) > 1 and self.method_state:
            raise UserInputError(
                f"{self._method.name} adapters run one at a time (each has its own rank budget); "
                f"set_adapter one of {names}"
            )
        held = {path: [n for n in names if n in w.modules_to_save] for path, w in self._wrappers()}
        for path, have in held.items():
            if len(have) > 1:
                raise UserInputError(
                    f"adapters {have} each have their own copy of modules_to_save module {path}, and one runs at "
                    "a time (PEFT refuses this too); activate one of them, or use adapter_names per row"
                )
        self._active = names
        for _, layer in self.adapter_layers():
            if any(n not in names for n in layer.merged_adapters):
                # otherwise the merged adapter stays in the weight under the new ones
                warnings.warn("switching adapters unmerges the merged one first", stacklevel=2)
                layer.unmerge()
            layer.active_adapters = [n for n in names if n in layer.r]
        for path, wrapper in self._wrappers():
            wrapper.active_adapter = held[path][0] if held[path] else None
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise UserInputError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.delete(adapter_name)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        self.targets.pop(adapter_name, None)
        self.method_state.pop(adapter_name, None)
        if adapter_name in self._active and self.peft_config:
            rest = [n for n in self._active if n != adapter_name]
            self.set_adapter(rest or next(iter(self.peft_config)))

    def _set_trainable(self) -> None:
        """Only the active adapters' parameters (and their bias / modules_to_save) train."""
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        for name in self._active:
            config = self.peft_config.get(name)
            if config is None or config.inference_mode:
                continue
            for param in self.adapter_parameters(name):
                param.requires_grad_(True)
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for path, param in self.base_model.named_parameters():
                    if path.endswith("bias") and ".original_module." not in path:
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for _, layer in self.adapter_layers():
                    if name in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        """Inside: every layer routes row ``i`` through ``adapter_names[i]`` (no-op for None)."""
        if adapter_names is None:
            yield
            return
        names = self._check_mixed_batch(adapter_names, args, kwargs)
        parts = [m for _, m in self.adapter_layers()] + [m for _, m in self._wrappers()]
        for module in parts:
            module.batch_adapters = names
        try:
            yield
        finally:
            for module in parts:
                module.batch_adapters = None

    def _check_mixed_batch(self, adapter_names: Any, args: tuple, kwargs: dict) -> list[str]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise UserInputError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        names = list(adapter_names)
        if any(layer.training for _, layer in self.adapter_layers()):  # where dropout would apply
            raise UserInputError("adapter_names is for inference (PEFT refuses it in training too); call model.eval() first")
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise UserInputError(
                f"adapter_names names unknown adapter(s) {unknown}; have {sorted(self.peft_config)} "
                f"and {BASE_ADAPTER!r} for no adapter"
            )
        rows = _batch_size(args, kwargs)
        if rows is not None and rows != len(names):
            raise UserInputError(f"adapter_names has {len(names)} name(s) for a batch of {rows} row(s); give one per row")
        used = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER]
        for path, layer in self.adapter_layers():
            if layer.merged:
                raise UserInputError(
                    f"adapter_names cannot run while adapters are merged ({path} holds {layer.merged_adapters} "
                    "merged; PEFT refuses this too); call unmerge_adapter() first"
                )
            held = [n for n in used if n in layer.r]
            why = layer.mixed_batch_refusal(held) if held else None
            if why is not None:
                raise UserInputError(f"adapter_names cannot run on {path}: {why}")
        return names
