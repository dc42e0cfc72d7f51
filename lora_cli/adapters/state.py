"""Adapter state: state dicts, saving and loading in PEFT's format, PEFT key names.

File keys are ``base_model.model.<module path>.<tensor suffix>`` with the adapter name
removed (``...q_proj.lora_A.weight``); a directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (PEFT's legacy ``adapter_model.bin`` is read too). Two
kinds of keys need translating on load:

- module paths from transformers 4 (``vit.encoder.layer.0.attention.attention.query``),
  renamed in transformers 5 (``vit.layers.0.attention.q_proj``);
- PEFT's redundant copies around ``modules_to_save`` (``X.modules_to_save.bias``,
  ``X.original_module.bias``) written with ``bias="all"``.

Saving does the reverse for tools that know only current names (PEFT): target_modules
and rank / alpha patterns written against old names are rewritten to current ones.

A file may also carry the base weights of the input / output embedding (PEFT's
``save_embedding_layers``: ``...embed_tokens.base_layer.weight`` when the embedding is
targeted, ``...embed_tokens.weight`` and ``lm_head.weight`` when the vocabulary was resized):
the rows a resize added are random, and only the file can bring them back. Loading copies
them into the base; saving writes them where PEFT's "auto" would.
:class:`AdapterStateMixin` gives :class:`~lora_cli.adapters.model.AdapterModel` these verbs.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_cli import atomic
from lora_cli.adapters import user_regex
from lora_cli.adapters.autobase import load_base_model
from lora_cli.adapters.base_weights import (
    BASE_REWRITES_NAME,
    apply_base_weights,
    write_base_weights,
)
from lora_cli.adapters.config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
from lora_cli.adapters.embeddings import (
    embedding_base_tensors,
    embedding_shape_problem,
    saved_embedding_layers,
)
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.registry import get_method, load
from lora_cli.adapters.targeting import candidate_modules, matches, module_aliases
from lora_cli.adapters.tensor_files import check_finite, read_adapter_weights
from lora_cli.errors import AdapterStateError, UserInputError

KEY_PREFIX = "base_model.model."


def remap_legacy_key(key: str, renamed: Mapping[str, str], wrappers: Collection[str]) -> str | None:
    """The current name of file key ``key``; None for a key that should be skipped.

    ``renamed`` maps old module paths to current ones; ``wrappers`` are the paths of
    modules_to_save wrappers.
    """
    if not key.startswith(KEY_PREFIX):
        return key
    rest = key[len(KEY_PREFIX) :]
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        new = renamed.get(".".join(parts[:i]))
        if new is not None:
            parts = new.split(".") + parts[i:]
            break
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in wrappers and parts[i] in ("modules_to_save", "original_module"):
            if parts[i] == "original_module":
                return None
            tail = parts[i + 1 :]
            if len(tail) > 1 and tail[0] == "default":  # live-style names with the adapter name
                tail = tail[1:]
            parts = parts[:i] + tail
            break
    return KEY_PREFIX + ".".join(parts)


class AdapterStateMixin:
    """The state verbs of :class:`~lora_cli.adapters.model.AdapterModel` (PEFT's names).

    The host provides ``base_model``, ``peft_config``, ``targets``, ``method_state``,
    ``active_adapter``, ``adapter_layers()``, ``_wrappers()``, ``add_adapter()`` and
    ``_set_trainable()``.
    """

    def live_adapter_tensors(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """File key -> live parameter (not a copy) of one adapter."""
        adapter_name = adapter_name or self.active_adapter
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
        return {k: v.detach().to("cpu").contiguous() for k, v in self.live_adapter_tensors(adapter_name).items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor], adapter_name: str | None = None) -> None:
        """Copy a PEFT-format state dict into adapter ``adapter_name``; strict about shapes
        and about adapter tensors, tolerant of PEFT's redundant copies."""
        adapter_name = adapter_name or self.active_adapter
        live = self.live_adapter_tensors(adapter_name)
        base_params = dict(self.base_model.named_parameters())
        embeddings = {KEY_PREFIX + key: param for key, (param, _) in embedding_base_tensors(self.base_model).items()}
        redundant = {f"{KEY_PREFIX}{path}.{suffix}" for path, layer in self.adapter_layers()
                     for suffix in layer.redundant_keys(adapter_name)}
        loaded_bases: set[nn.Module] = set()
        wrappers = {path for path, _ in self._wrappers()}
        renamed = {old: new for new, old in module_aliases(self.base_model).items()}
        seen: set[str] = set()
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, tensor in state.items():
            key = remap_legacy_key(key, renamed, wrappers)
            if key is None or key in redundant:  # a redundant copy PEFT writes (modules_to_save's original)
                continue
            if key in embeddings:  # a base embedding weight the file carries (save_embedding_layers)
                param = embeddings[key]
                if param.shape != tensor.shape:
                    mismatched.append(embedding_shape_problem(key, tuple(tensor.shape), tuple(param.shape)))
                    continue
                param.data.copy_(tensor.to(dtype=param.dtype, device=param.device))
                loaded_bases.add(embedding_base_tensors(self.base_model)[key[len(KEY_PREFIX):]][1])
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
        for module in loaded_bases:
            if isinstance(module, AdapterLayer):
                module.base_weight_loaded()
        missing = [k for k in live if k not in seen and not k.endswith("bias")]
        problems = fit_problems(mismatched, missing, unexpected)
        if problems:
            raise AdapterStateError(
                f"the adapter does not fit this model ({'; '.join(problems)}); "
                "was it trained on a different base model or architecture?"
            )

    # ----------------------------------------------------------- directories
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        state_dict: dict[str, Tensor] | None = None,
        convert_to_original_base: bool = False,
        save_embedding_layers: bool | str = "auto",
    ) -> None:
        """PEFT layout: ``default`` at the root, any other adapter in a sub-folder.

        ``save_embedding_layers``: also write the base weights of the input / output embedding,
        as PEFT does. "auto" (PEFT's default): when ``target_modules`` names ``embed_tokens`` or
        ``lm_head`` (and no trainable tokens are used), or when the embedding's rows differ from
        the vocabulary of the base checkpoint (a local ``base_model_name_or_path`` folder; no hub
        look-up), i.e. the vocabulary was resized and its new rows exist nowhere else.

        ``state_dict``: the active adapter's tensors (``get_adapter_state_dict`` layout) to
        write instead of the live ones, e.g. full copies gathered from a sharded (FSDP) model.
        ``convert_to_original_base``: an adapter whose init rewrote base weights (PiSSA, OLoRA,
        CorDA, LoRA-GA, LoftQ) is written relative to the original base, as a plain LoRA of
        rank 2r plus, for changes that are not low rank, ``base_rewrites.safetensors``
        (see :mod:`lora_cli.adapters.methods.lora.base_rewrites`); PEFT's
        ``path_initial_model_for_weight_conversion``. Other adapters are written as they are.
        """
        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}")
        root = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            target = root if name == "default" else root / name
            given = state_dict is not None and name == self.active_adapter
            state = dict(state_dict) if given else self.get_adapter_state_dict(name)
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                base_config = getattr(self.base_model, "config", None)
                config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
            paths = self.targets.get(name, [])
            embedding_state = saved_embedding_layers(self.base_model, config, save_embedding_layers)
            config.target_modules = _portable_targets(self.base_model, config, paths)
            aliases = module_aliases(self.base_model)
            for field_name in ("rank_pattern", "alpha_pattern"):
                pattern = getattr(config, field_name, None)
                if pattern:
                    setattr(config, field_name, _portable_patterns(pattern, paths, aliases))
            method_state = self.method_state.get(name)
            if method_state is not None:
                state, config = method_state.export(state, config)
            base_weights: dict[str, Tensor] = {}
            to_original_base = get_method(config.peft_type).to_original_base
            if convert_to_original_base and to_original_base is not None:
                state, config, base_weights = load(to_original_base)(self, name, state, config)
            state.update({KEY_PREFIX + key: tensor for key, tensor in embedding_state.items()})
            save_adapter_files(target, state, config)
            write_base_weights(target, base_weights)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module | str | os.PathLike | None = None,
        model_id: str | os.PathLike | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **base_kwargs: Any,
    ) -> Self:
        """Load a PEFT-format adapter directory onto ``model``, or with no model onto the base it
        names, as PEFT's AutoPeftModel does (:mod:`.autobase`; ``base_kwargs`` go to its loader).
        ``is_trainable=False`` (the default) freezes the adapter, as in PEFT."""
        if model_id is None and isinstance(model, (str, os.PathLike)):
            model, model_id = None, model
        if model_id is None:
            raise UserInputError("from_pretrained needs the adapter folder: from_pretrained([base_model,] adapter_dir)")
        config = AdapterConfig.from_pretrained(model_id)
        if model is None:
            model = load_base_model(config, Path(model_id), **base_kwargs)
        apply_base_weights(model, model_id)  # an adapter saved for the original base of a LoftQ run
        config.inference_mode = not is_trainable
        own_cls = get_method(config.peft_type).model_cls  # e.g. trainable tokens' model, which ties
        if isinstance(own_cls, type) and issubclass(own_cls, cls):
            cls = own_cls
        instance = cls(model, config, adapter_name)
        instance._load_weights(Path(model_id), adapter_name)
        if not is_trainable:
            instance.eval()
        return instance

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        if (Path(model_id) / BASE_REWRITES_NAME).is_file():
            raise UserInputError(
                f"{model_id} holds {BASE_REWRITES_NAME}: the adapter needs its own rewritten base "
                "weights (LoftQ), which would change the base under the adapters already loaded; load it alone "
                "with from_pretrained"
            )
        config = AdapterConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        self._load_weights(Path(model_id), adapter_name)
        self._set_trainable()

    def _load_weights(self, directory: Path, adapter_name: str) -> None:
        state = read_adapter_weights(directory)
        method_state = self.method_state.get(adapter_name)
        if method_state is not None:
            method_state.before_load(self.peft_config[adapter_name])
        self.load_adapter_state_dict(state, adapter_name)


def fit_problems(mismatched: list[str], missing: list[str], unexpected: list[str]) -> list[str]:
    """How a file's tensors fail to fit a model, for one error message (a few examples each)."""
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:5]))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) fit no module, e.g. {', '.join(unexpected[:3])}")
    return problems


def _portable_patterns(pattern: dict[str, Any], paths: list[str], aliases: dict[str, str]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern as PEFT (current names only) will apply them: a key that
    reaches adapted modules through their transformers-4 names also gets their current paths."""
    out: dict[str, Any] = {}
    for key, value in pattern.items():
        def hit(name: str, key: str = key) -> bool:
            return user_regex.fullmatch(rf"(.*\.)?(?:{key})", name)

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


def save_adapter_files(directory: Path, state: dict[str, Tensor], config: AdapterConfig) -> None:
    """PEFT's two files (weights, then config), each written whole or not at all (:mod:`lora_cli.atomic`);
    the config's text is made first, so a config that cannot be written leaves both files as they were.
    Weights holding NaN or inf are never written (a NonFiniteError names the tensor)."""
    check_finite(state, f"the adapter to be written to {directory}",
                 "its training diverged (lower training.learning_rate) or a computation on it overflowed")
    text = config.json_text()
    directory.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic.write_text(directory / CONFIG_NAME, text)
