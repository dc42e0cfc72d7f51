"""AdapterModel: inject adapters into a model, train, save/load in PEFT format, merge.

    model = get_adapter_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    model.save_pretrained("out/")                    # adapter_config.json + safetensors
    merged = model.merge_and_unload(safe_merge=True)  # a plain model again

The wrapped model is changed in place: each targeted module is replaced by the method's
:class:`AdapterLayer` (the original kept as ``base_layer``), each ``modules_to_save``
module by a :class:`ModulesToSaveWrapper`. Live parameter names therefore match PEFT's
(``...q_proj.base_layer.weight``), and file keys are PEFT's
(``base_model.model.<path>.lora_A.weight``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lora_cli.adapters.checkpoint import KEY_PREFIX, remap_legacy_key
from lora_cli.adapters.config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.registry import get_method
from lora_cli.adapters.targeting import (
    candidate_modules,
    matches,
    resolve_modules_to_save,
    resolve_targets,
)
from lora_cli.errors import AdapterStateError, LoraCliError, UserInputError

logger = logging.getLogger(__name__)


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: one trainable copy per adapter, the original kept frozen
    for when adapters are disabled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)


class AdapterHooks:
    """Per-model state a method may need (AdaLoRA's rank allocator). No-ops by default."""

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


class AdapterModel(nn.Module):
    """A model with named adapters of one method. Calls go through to the base model."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.hooks: dict[str, AdapterHooks] = {}
        self.targets: dict[str, list[str]] = {}
        self._method = get_method(config.peft_type)
        self.active_adapter = adapter_name
        self._adapters_disabled = False
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------ passthrough
    # False while a trainer adds the regularizer itself (it knows the loss scaling across
    # processes and accumulation steps; see lora_cli.training.trainer.AdapterTrainer.compute_loss)
    add_regularizer_to_loss = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.base_model(*args, **kwargs)
        hooks = self.hooks.get(self.active_adapter)
        loss = getattr(outputs, "loss", None)
        if hooks is not None and loss is not None and self.training and not self._adapters_disabled and self.add_regularizer_to_loss:
            penalty = hooks.regularizer()
            if penalty is not None:
                outputs.loss = loss + penalty
        return outputs

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
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
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
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

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
        aliases = _legacy_aliases(self.base_model)
        paths = resolve_targets(self.base_model, config, method.supports, aliases)
        created: list[str] = []
        try:
            for path in paths:
                module = self.base_model.get_submodule(path)
                if not isinstance(module, AdapterLayer):
                    module = method.layer_cls(module)
                    self.base_model.set_submodule(path, module)
                r, alpha = _rank_and_alpha(config, path, aliases.get(path))
                module.add(adapter_name, config, r, alpha)
                created.append(path)
            for path in resolve_modules_to_save(self.base_model, config.modules_to_save or [], aliases):
                module = self.base_model.get_submodule(path)
                if not isinstance(module, ModulesToSaveWrapper):
                    module = ModulesToSaveWrapper(module)
                    self.base_model.set_submodule(path, module)
                module.add(adapter_name)
        except Exception:
            for path in created:
                layer = self.base_model.get_submodule(path)
                layer.delete(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self.targets[adapter_name] = paths
        if method.model_hooks is not None:
            self.hooks[adapter_name] = method.model_hooks(self, adapter_name)
        self._set_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise UserInputError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for _, layer in self.adapter_layers():
            if layer.merged and layer.merged_adapters != [adapter_name]:
                # otherwise the merged adapter stays in the weight under the new one
                warnings.warn("switching adapters unmerges the merged one first", stacklevel=2)
                layer.unmerge()
            layer.active_adapters = [adapter_name] if adapter_name in layer.r else []
        for _, wrapper in self._wrappers():
            wrapper.active_adapter = adapter_name
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
        self.hooks.pop(adapter_name, None)
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def _set_trainable(self) -> None:
        """Only the active adapter's parameters (and its bias / modules_to_save) train."""
        config = self.peft_config.get(self.active_adapter)
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        if config is None or config.inference_mode:
            return
        for param in self.adapter_parameters(self.active_adapter):
            param.requires_grad_(True)
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, param in self.base_model.named_parameters():
                if name.endswith("bias") and ".original_module." not in name:
                    param.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in self.adapter_layers():
                if self.active_adapter in layer.r and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)

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
        names = adapter_names or [self.active_adapter]
        layers = [layer for _, layer in self.adapter_layers()]
        # A refused safe merge must leave the weights bit-identical; subtracting the deltas
        # again (or dividing DoRA's scale back out) only restores them up to rounding.
        saved = (
            [(layer, layer.base_layer.weight.detach().clone(), list(layer.merged_adapters)) for layer in layers]
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
                for layer, weight, state in saved:
                    layer.base_layer.weight.copy_(weight)
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
        for path, layer in list(self.adapter_layers()):
            self.base_model.set_submodule(path, layer.base_layer)
        for path, wrapper in list(self._wrappers()):
            module = wrapper.active_module() if keep_heads else wrapper.original_module
            self.base_model.set_submodule(path, module)
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        return self.base_model

    # ------------------------------------------------------------ state dicts
    def _live_tensors(self, adapter_name: str) -> dict[str, Tensor]:
        """File key -> live parameter for adapter ``adapter_name``."""
        config = self.peft_config[adapter_name]
        out: dict[str, Tensor] = {}
        for path, layer in self.adapter_layers():
            for suffix, param in layer.adapter_tensors(adapter_name):
                out[f"{KEY_PREFIX}{path}.{suffix}"] = param
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                for name, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"{KEY_PREFIX}{path}.{name}"] = tensor
        bias = getattr(config, "bias", "none")
        if bias != "none":
            for name, param in self.base_model.named_parameters():
                if not name.endswith("bias") or ".original_module." in name or ".modules_to_save." in name:
                    continue
                if bias == "all" or (name.endswith(".base_layer.bias") and _layer_has(self.base_model, name, adapter_name)):
                    out[f"{KEY_PREFIX}{name}"] = param
        return out

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The tensors PEFT would save for this adapter, detached, on the CPU."""
        name = adapter_name or self.active_adapter
        return {k: v.detach().to("cpu").contiguous() for k, v in self._live_tensors(name).items()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        state_dict: dict[str, Tensor] | None = None,
    ) -> None:
        """PEFT layout: ``default`` at the root, any other adapter in a sub-folder.

        ``state_dict``: the active adapter's tensors (``get_adapter_state_dict`` layout) to
        write instead of the live ones, e.g. full copies gathered from a sharded (FSDP) model.
        """
        root = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            target = root if name == "default" else root / name
            given = state_dict is not None and name == self.active_adapter
            state = dict(state_dict) if given else self.get_adapter_state_dict(name)
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                base_config = getattr(self.base_model, "config", None)
                config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
            config.target_modules = _portable_targets(self.base_model, config, self.targets.get(name, []))
            aliases = _legacy_aliases(self.base_model)
            for field_name in ("rank_pattern", "alpha_pattern"):
                pattern = getattr(config, field_name, None)
                if pattern:
                    setattr(config, field_name, _portable_patterns(pattern, self.targets.get(name, []), aliases))
            hooks = self.hooks.get(name)
            if hooks is not None:
                state, config = hooks.export(state, config)
            _atomic_save(target, state, config)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdapterModel:
        """Load a PEFT-format adapter directory onto ``model``."""
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        instance = cls(model, config, adapter_name)
        instance._load_weights(Path(model_id), adapter_name)
        if not is_trainable:
            instance.eval()
        return instance

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        self._load_weights(Path(model_id), adapter_name)
        self._set_trainable()

    def _load_weights(self, directory: Path, adapter_name: str) -> None:
        state = read_adapter_weights(directory)
        hooks = self.hooks.get(adapter_name)
        if hooks is not None:
            hooks.before_load(self.peft_config[adapter_name])
        self.load_adapter_state_dict(state, adapter_name)

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor], adapter_name: str | None = None) -> None:
        """Copy a PEFT-format state dict into adapter ``adapter_name``; strict about shapes
        and about adapter tensors, tolerant of PEFT's redundant copies."""
        name = adapter_name or self.active_adapter
        live = self._live_tensors(name)
        base_params = dict(self.base_model.named_parameters())
        wrappers = {path for path, _ in self._wrappers()}
        aliases = _legacy_aliases(self.base_model)
        renamed = {old: new for new, old in aliases.items()}
        seen: set[str] = set()
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, tensor in state.items():
            key = remap_legacy_key(key, renamed, wrappers)
            if key is None:  # a redundant copy PEFT writes (modules_to_save's original)
                continue
            target = live.get(key)
            if target is None and key.startswith(KEY_PREFIX) and key.endswith("bias"):
                target = base_params.get(key[len(KEY_PREFIX):])
            if target is None:
                unexpected.append(key)
                continue
            if target.shape != tensor.shape:
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
            target.data.copy_(tensor.to(dtype=target.dtype, device=target.device))
            seen.add(key)
        missing = [k for k in live if k not in seen and not k.endswith("bias")]
        problems = []
        if mismatched:
            problems.append("shape mismatch: " + "; ".join(mismatched[:5]))
        if missing:
            problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) fit no module, e.g. {', '.join(unexpected[:3])}")
        if problems:
            raise AdapterStateError(
                f"the adapter does not fit this model ({'; '.join(problems)}); "
                "was it trained on a different base model or architecture?"
            )

    # ------------------------------------------------------------------ AdaLoRA
    def update_and_allocate(self, global_step: int) -> None:
        """Rank-budget step of AdaLoRA; call after backward, before zero_grad."""
        hooks = self.hooks.get(self.active_adapter)
        if hooks is None:
            raise LoraCliError(f"update_and_allocate is for AdaLoRA; this adapter is {self._method.name}")
        hooks.update_and_allocate(global_step)


LEGACY_WEIGHTS_NAME = "adapter_model.bin"
"""PEFT's pre-safetensors format: a ``torch.save``-d dict of tensors (a pickle)."""

_RESAVE = (
    "re-save the adapter from the model that trained it (loracli train, or PEFT's "
    "save_pretrained(..., safe_serialization=True)), or train it again"
)


class AdapterFileError(UserInputError, ValueError):
    """An adapter weights file that cannot be read: truncated, corrupt, or not plain tensors."""


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of the adapter in ``directory``: ``adapter_model.safetensors``, else
    PEFT's legacy ``adapter_model.bin``.

    Nothing is ever unpickled beyond plain tensors and containers: a ``.bin`` is read
    only through ``torch.load(weights_only=True)`` (PEFT's own ``.bin`` files are plain
    tensor dicts and load), and anything else in it is refused, never retried unsafely.
    """
    directory = Path(directory)
    file = directory / WEIGHTS_NAME
    if file.is_file():
        return load_safetensors(file)
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        return load_torch_tensors(legacy)
    raise UserInputError(
        f"no {WEIGHTS_NAME} (nor PEFT's legacy {LEGACY_WEIGHTS_NAME}) in {directory}: the adapter's weights are "
        "missing; copy them next to its adapter_config.json, or train the adapter again"
    )


def load_safetensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with damage reported as a :class:`AdapterFileError`
    that names the file (truncated copies, zero-byte files, random bytes)."""
    from safetensors import SafetensorError

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AdapterFileError(
            f"{file}: truncated or corrupt safetensors file ({reason}); {_RESAVE}, "
            "or copy the file again if it was cut short in transfer"
        ) from None


def load_torch_tensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """A ``torch.save``-d dict of tensors, read with ``weights_only=True`` only.

    A file that needs anything more (arbitrary classes, code) is refused in our words:
    unpickling it could run code. A damaged file is reported as truncated or corrupt.
    """
    import pickle

    convert = (
        "re-create the weights as safetensors where the adapter was made: load the trained model there and "
        f"call save_pretrained(out_dir, safe_serialization=True), which writes {WEIGHTS_NAME} (tensors only)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for our users
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterFileError(
            f"{file}: refused: this pickled weights file holds more than plain tensors (or is corrupt), and "
            "loracli never unpickles such objects, because loading them can run code. If you trust its source, "
            f"{convert}; a PEFT adapter_model.bin that holds only tensors loads here as it is"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else "the data ends early"
        raise AdapterFileError(
            f"{file}: truncated or corrupt PyTorch weights file ({type(exc).__name__}: {reason}); "
            f"{_RESAVE}, or copy the file again if it was cut short in transfer"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        found = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise AdapterFileError(
            f"{file}: not an adapter state dict (expected a mapping of tensor names to tensors, found {found}); "
            f"{_RESAVE}"
        )
    return state


def get_adapter_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdapterModel:
    """Inject ``config``'s adapter into ``model`` (in place) and return the wrapper."""
    if isinstance(model, AdapterModel):
        raise UserInputError("the model already has adapters; use model.add_adapter(name, config) instead")
    return AdapterModel(model, config, adapter_name)


def _rank_and_alpha(config: AdapterConfig, path: str, old_path: str | None = None) -> tuple[int, float]:
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


def _portable_patterns(pattern: dict[str, Any], paths: list[str], aliases: dict[str, str]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern as PEFT (current names only) will apply them: a key that
    reaches adapted modules through their transformers-4 names also gets their current paths."""
    out: dict[str, Any] = {}
    for key, value in pattern.items():
        def hit(name: str, key: str = key) -> bool:
            return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None

        via_old = [p for p in paths if p in aliases and hit(aliases[p]) and not hit(p)]
        if not via_old or any(hit(p) for p in paths):
            out[key] = value
        for path in via_old:
            out.setdefault(re.escape(path), value)
    return out


def _portable_targets(model: nn.Module, config: AdapterConfig, paths: list[str]):
    """target_modules as tools that do not know old module names (PEFT) will resolve them.

    A rule that matched some modules only through their transformers-4 names is rewritten
    to current names: their leaf names when those select exactly the same modules, else
    the full paths. "all-linear" is written out the same way (as PEFT does): PEFT's
    "all-linear" also adapts a classifier head that ours leaves alone.
    """
    rule = config.target_modules
    if rule is None or not paths:
        return rule
    modules = [p for p in candidate_modules(model) if isinstance(model.get_submodule(p), AdapterLayer)]
    if {p for p in modules if matches(p, rule)} == set(paths):
        return rule
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    candidates = [p for p in candidate_modules(model) if matches(p, leaves)]
    return leaves if set(candidates) == set(paths) else sorted(paths)


def _layer_has(model: nn.Module, param_name: str, adapter_name: str) -> bool:
    layer = model.get_submodule(param_name[: -len(".base_layer.bias")])
    return isinstance(layer, AdapterLayer) and adapter_name in layer.r


def _legacy_aliases(model: nn.Module) -> dict[str, str]:
    """transformers-4 names of a transformers-5 model's modules (empty for other models)."""
    if "transformers" not in sys.modules or not hasattr(model, "config"):
        return {}
    from lora_cli.hf_names import legacy_aliases

    return legacy_aliases(model, candidate_modules(model))


def _atomic_save(directory: Path, state: dict[str, Tensor], config: AdapterConfig) -> None:
    """Write both files into a temp dir beside the target, then move them in."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-adapter-") as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, name), directory / name)
