"""AdapterModel: inject adapters into a model, activate them, set what trains, merge.

    model = get_adapter_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    model.save_pretrained("out/")                    # adapter_config.json + safetensors
    merged = model.merge_and_unload(safe_merge=True)  # a plain model again

The wrapped model is changed in place: each targeted module is replaced by the method's
:class:`AdapterLayer` (the original kept as ``base_layer``), each ``modules_to_save``
module by a :class:`ModulesToSaveWrapper`. Live parameter names therefore match PEFT's
(``...q_proj.base_layer.weight``), and file keys are PEFT's
(``base_model.model.<path>.lora_A.weight``). Saving and loading live in
:mod:`lora_cli.adapters.state`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.combine import AdapterCombineMixin
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.kinds import HF_CONV1D
from lora_cli.adapters.layers import AdapterLayer, rank_refusal
from lora_cli.adapters.mixed import MultiAdapterMixin
from lora_cli.adapters.modules_to_save import ModulesToSaveWrapper
from lora_cli.adapters.registry import get_method
from lora_cli.adapters.state import AdapterStateMixin
from lora_cli.adapters.targeting import module_aliases, resolve_modules_to_save, resolve_targets
from lora_cli.errors import LoraCliError, TargetingError, UserInputError

AUXILIARY_OPTIONS = ("trainable_token_indices", "target_parameters", "modules_to_save")
"""Config options that adapt something besides target_modules, so target_modules may be []
(``modules_to_save`` alone: the head trained, the rest frozen, a linear probe; list the
backbone too and it is full fine-tuning)."""


def _is_truthy_option(config: AdapterConfig, name: str) -> bool:
    return bool(getattr(config, name, None))


class AdapterModel(MultiAdapterMixin, AdapterStateMixin, AdapterCombineMixin, nn.Module):
    """A model with named adapters of one method. Calls go through to the base model;
    saving, loading and state dicts come from :class:`AdapterStateMixin`."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.method_state: dict[str, MethodState] = {}  # AdaLoRA's rank allocator, per adapter
        self.targets: dict[str, list[str]] = {}
        self._method = get_method(config.peft_type)
        self._active = [adapter_name]
        self._adapters_disabled = False
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------ passthrough
    _hf_peft_config_loaded = True
    """Tells transformers' Trainer that trainable adapters are attached: it refuses to train a
    quantized base (``model.quantization``) without them. Set here, never on the base model,
    whose ``save_pretrained`` reads the same name."""
    add_regularizer_to_loss = True
    """forward adds :meth:`regularizer` to ``outputs.loss`` in training; see :meth:`loss_without_regularizer`."""

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one name per row, ``"__base__"`` for
        none) runs a mixed-adapter batch, see :mod:`lora_cli.adapters.mixed`."""
        with self.mixed_batch(adapter_names, args, kwargs):
            outputs = self.base_model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if loss is not None and self.training and self.add_regularizer_to_loss:
            penalty = self.regularizer()
            if penalty is not None:
                outputs.loss = loss + penalty
        return outputs

    def regularizer(self) -> Tensor | None:
        """The active adapter's term for the training loss (AdaLoRA's orthogonality penalty),
        or None: for methods without one, and while adapters are disabled."""
        state = self.method_state.get(self.active_adapter)
        if state is None or self._adapters_disabled:
            return None
        return state.regularizer()

    @contextlib.contextmanager
    def loss_without_regularizer(self) -> Iterator[None]:
        """forward leaves :meth:`regularizer` out of ``outputs.loss`` inside this block, for a
        trainer that adds it itself (it knows the loss scaling across processes and
        accumulation steps; see lora_cli.training.trainer.AdapterTrainer.compute_loss)."""
        before = self.add_regularizer_to_loss
        self.add_regularizer_to_loss = False
        try:
            yield
        finally:
            self.add_regularizer_to_loss = before

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------- inspection
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield path, module

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT counts them: a bitsandbytes 4-bit weight
        packs two values per byte of its storage, so it counts its unpacked size."""
        trainable = total = 0
        for param in self.parameters():
            n = _unpacked_numel(param)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_parameters(self, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
        """Parameters of one adapter (its layers and its modules_to_save copies)."""
        name = adapter_name or self.active_adapter
        for _, layer in self.adapter_layers():
            for _, param in layer.adapter_tensors(name):
                yield param
        for _, wrapper in self._wrappers():
            if name in wrapper.modules_to_save:
                yield from wrapper.modules_to_save[name].parameters()

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject adapter ``adapter_name``; it is not active until :meth:`set_adapter`."""
        if adapter_name in self.peft_config:
            raise UserInputError(f"an adapter named {adapter_name!r} already exists; pick another name")
        method = get_method(config.peft_type)
        if method.name != self._method.name:
            raise UserInputError(
                f"this model holds {self._method.name} adapters; one model holds adapters of one method, "
                f"so a {method.name} adapter cannot be added"
            )
        aliases = module_aliases(self.base_model)
        if config.target_modules is None and _is_truthy_option(config, "target_parameters"):
            # the parameters alone, as PEFT adapts them where it has no default target modules; written
            # as [] so that PEFT, which fills in defaults for a null on some model types, adds none
            config = config.replace(target_modules=[])
        if config.target_modules == [] and any(_is_truthy_option(config, k) for k in AUXILIARY_OPTIONS):
            paths = []  # PEFT's way to adapt only parameters / tokens / whole modules: target_modules=[]
        else:
            paths = resolve_targets(self.base_model, config, method.refusal, aliases)
        created: list[str] = []
        try:
            for path in paths:
                module = self.base_model.get_submodule(path)
                r, alpha = rank_and_alpha(config, path, aliases.get(path))
                made = getattr(config, "init_r", r)  # the rank the layer will allocate (AdaLoRA's init_r)
                too_large = rank_refusal(module, made) if isinstance(made, int) else None
                if too_large:  # before any tensor is made
                    raise TargetingError(f"target module {path}: {too_large}; nothing was adapted")
                if not isinstance(module, AdapterLayer):
                    module = method.layer_for(module)(module)
                    self.base_model.set_submodule(path, module)
                try:
                    module.add(adapter_name, config, r, alpha)
                except TargetingError as exc:  # the layer's reason, with where it is
                    raise TargetingError(f"target module {path}: {exc}; nothing was adapted") from None
                created.append(path)
            for path in resolve_modules_to_save(self.base_model, config.modules_to_save or [], aliases):
                module = self.base_model.get_submodule(path)
                if not isinstance(module, ModulesToSaveWrapper):
                    module = ModulesToSaveWrapper(module)
                    self.base_model.set_submodule(path, module)
                module.add(adapter_name)
            for inject in method.injector_fns():  # layers beside the targets (LoRA's trainable tokens)
                created += inject(self, adapter_name, config, aliases)
        except Exception:
            for path in created:
                layer = self.base_model.get_submodule(path)
                layer.delete(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self.targets[adapter_name] = paths
        _warn_fan_in_fan_out(self.base_model, config, paths)
        if method.state_cls is not None:
            self.method_state[adapter_name] = method.state_cls(self, adapter_name)
        self._set_trainable()

    @property
    def adapters_disabled(self) -> bool:
        """True inside :meth:`disable_adapter`."""
        return self._adapters_disabled

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: adapters off (merged ones are unmerged first)."""
        self._toggle(True)
        try:
            yield
        finally:
            self._toggle(False)

    def _toggle(self, disabled: bool) -> None:
        self._adapters_disabled = disabled
        for _, layer in self.adapter_layers():
            if disabled and layer.merged:
                layer.unmerge()
            layer.disabled = disabled
        for _, wrapper in self._wrappers():
            wrapper.disabled = disabled

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (reversible with :meth:`unmerge_adapter`)."""
        names = adapter_names or self.active_adapters
        layers = [layer for _, layer in self.adapter_layers()]
        # A refused safe merge must leave the weights bit-identical; subtracting the deltas
        # again (or dividing DoRA's scale back out) only restores them up to rounding.
        saved = (
            [(layer, [t.detach().clone() for t in layer.merge_targets()], list(layer.merged_adapters)) for layer in layers]
            if safe_merge
            else []
        )
        merged: list[AdapterLayer] = []
        try:
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=names)
                merged.append(layer)
        except Exception:
            with torch.no_grad():
                for layer, tensors, state in saved:
                    for live, kept in zip(layer.merge_targets(), tensors, strict=True):
                        live.copy_(kept)
                    layer.merged_adapters = state
            if not saved:
                for layer in merged:  # all or nothing
                    layer.unmerge()
            raise

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapter and return the plain base model with trained heads in place."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_heads=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging: the original base model back."""
        self.unmerge_adapter()
        return self._unload(keep_heads=False)

    def _unload(self, keep_heads: bool) -> nn.Module:
        # innermost first: an attention's out_proj layer lives inside the attention's layer
        for path, layer in reversed(list(self.adapter_layers())):
            self.base_model.set_submodule(path, layer.base_layer)
        for path, wrapper in list(self._wrappers()):
            module = wrapper.active_module() if keep_heads else wrapper.original_module
            self.base_model.set_submodule(path, module)
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        return self.base_model

    # ------------------------------------------------------------------ AdaLoRA
    def update_and_allocate(self, global_step: int) -> None:
        """Rank-budget step of AdaLoRA; call after backward, before zero_grad."""
        state = self.method_state.get(self.active_adapter)
        if state is None:
            raise LoraCliError(f"update_and_allocate is for AdaLoRA; this adapter is {self._method.name}")
        state.update_and_allocate(global_step)


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Inject ``config``'s adapter into ``model`` (in place) and return the wrapper: an
    :class:`AdapterModel`, or the method's own ``model_cls`` (see the registry)."""
    if isinstance(model, AdapterModel):
        raise UserInputError("the model already has adapters; use model.add_adapter(name, config) instead")
    model_cls = get_method(config.peft_type).model_cls
    return (model_cls or AdapterModel)(model, config, adapter_name)


def load_adapter_model(
    model: nn.Module | None, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **base_kwargs: Any
) -> nn.Module:
    """Load a PEFT-format adapter folder with the class its method uses (``AdapterModel``
    for the layer methods, the method's ``model_cls`` otherwise)."""
    config = AdapterConfig.from_pretrained(model_id)
    model_cls = get_method(config.peft_type).model_cls or AdapterModel
    return model_cls.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **base_kwargs)


def _unpacked_numel(param: Tensor) -> int:
    if type(param).__name__ != "Params4bit":
        return param.numel()
    storage = getattr(param, "quant_storage", None)
    itemsize = getattr(storage, "itemsize", 1) if storage is not None else 1
    return param.numel() * 2 * itemsize


def _warn_fan_in_fan_out(model: nn.Module, config: AdapterConfig, paths: list[str]) -> None:
    """fan_in_fan_out describes GPT-2's Conv1D, whose (in, out) layout the engine detects by
    itself; set on a config that adapted no such layer it means a mistake."""
    if not getattr(config, "fan_in_fan_out", False):
        return
    kinds = {model.get_submodule(p).kind for p in paths}
    if HF_CONV1D not in kinds:
        warnings.warn(
            "adapter.fan_in_fan_out: true is for models with GPT-2-style Conv1D layers; none of the "
            f"{len(paths)} adapted layer(s) of {type(model).__name__} is one, so it is ignored (set it to false)",
            UserWarning,
            stacklevel=4,
        )


def rank_and_alpha(config: AdapterConfig, path: str, old_path: str | None = None) -> tuple[int, float]:
    """Per-module r and alpha; pattern keys may use the module's transformers-4 name, as
    target_modules may."""
    names = [path] if old_path is None else [path, old_path]
    missing = object()

    def lookup(pattern: dict[str, Any] | None, default: Any) -> Any:
        for name in names:
            value = config.pattern_value(pattern or {}, name, missing)
            if value is not missing:
                return value
        return default

    r = lookup(config.rank_pattern, getattr(config, "r", 8))
    alpha_default = getattr(config, "lora_alpha", getattr(config, "alpha", r))
    return r, lookup(config.alpha_pattern, alpha_default)


class MethodState:
    """Per-model state a method may keep beside its layers (AdaLoRA's rank allocator).

    One instance per adapter, built as ``state_cls(adapter_model, adapter_name)`` (the method
    table's ``state_cls``). The defaults do nothing, so a method without such state needs no subclass.
    """

    def __init__(self, model: AdapterModel, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def regularizer(self) -> Tensor | None:
        """A term added to the training loss, or None."""
        return None

    def export(self, state: dict[str, Tensor], config: AdapterConfig) -> tuple[dict[str, Tensor], AdapterConfig]:
        """Adjust the state dict and config being saved."""
        return state, config

    def before_load(self, config: AdapterConfig) -> None:
        """Reshape the layers to fit a saved adapter before its tensors are copied in."""

    def update_and_allocate(self, global_step: int) -> None:
        raise LoraCliError(f"{type(self).__name__}: this method has no rank allocation")
