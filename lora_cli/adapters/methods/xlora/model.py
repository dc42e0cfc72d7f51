"""X-LoRA's model: frozen LoRA experts mixed per token by a trained gating head.

    scaling pass (no grad):  h = base(x; every expert weighted by scaling_pass_value).hidden_states[-1]
    gating head:             g = softmax(MLP(h) / T)                 (batch, seq, layers, experts)
    scaled pass:             y_l = W_l x + gsw * sum_e g[:, :, l, e] * s_e B_e A_e x   in every LoRA layer l

Buehler & Buehler, arXiv:2402.07148. The experts are ordinary LoRA adapters loaded into
this :class:`~lora_cli.adapters.model.AdapterModel` (one LoraLayer holds all of them);
the head is the only new module. Both passes happen inside one call of the base model
(a forward pre-hook runs the scaling pass), so ``forward``, ``generate`` and gradient
checkpointing all see the same scalings.

The per-token weighting is a hook of the LoRA layers, not a fork of their math: each LoRA
layer gets a gate as its ``batch_adapters`` (see :meth:`lora_cli.adapters.layers.AdapterLayer.rows_forward`),
which runs the base layer and adds each expert's own ``add_update`` times its weight.

Files (PEFT's layout): ``adapter_config.json`` (peft_type XLORA, ``adapters`` {"0": path,
...}), ``adapter_model.safetensors`` with ``base_model.internal_xlora_classifier.*``, and
each expert as a plain LoRA folder in a sub-folder named after it. PEFT 0.21 applies its
experts only when they are named "0", "1", ... so the file keys are the indices and the
sub-folder names carry our names. Merging is refused: the gating depends on the input.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lora_cli.adapters.autobase import load_base_model
from lora_cli.adapters.config import CONFIG_NAME, AdapterConfig
from lora_cli.adapters.kinds import EMBEDDING, HF_CONV1D, LINEAR
from lora_cli.adapters.layers import HALF_DTYPES
from lora_cli.adapters.methods.lora.layer import LoraLayer
from lora_cli.adapters.methods.xlora.config import MERGE_REFUSAL
from lora_cli.adapters.methods.xlora.experts import (
    RUN_ADAPTER_DIR,
    read_expert_config,
    resolve_experts,
    saved_experts,
)
from lora_cli.adapters.methods.xlora.head import XLoraClassifier
from lora_cli.adapters.model import AdapterModel
from lora_cli.adapters.registry import get_method
from lora_cli.adapters.state import AdapterStateMixin, save_adapter_files
from lora_cli.adapters.tensor_files import read_adapter_weights
from lora_cli.errors import AdapterStateError, LoraCliError, UserInputError

HEAD_KEY = "base_model.internal_xlora_classifier."
"""File-key prefix of the gating head (PEFT's: PeftModel.base_model is its XLoraModel)."""
EXPERT_KEY = "xlora_experts."
"""Prefix of trainable experts' tensors in checkpoints (``xlora_experts.<name>.<LoRA key>``)."""
GATED_KINDS = (LINEAR, HF_CONV1D, EMBEDDING)


class _ExpertGate:
    """A LoRA layer's ``batch_adapters`` while X-LoRA owns it: routes its forward to the model."""

    def __init__(self, owner: XLoraModel, index: int) -> None:
        self.owner, self.index = owner, index

    def layer_forward(self, layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.owner._gated_forward(layer, self.index, x, *args, **kwargs)


# ------------------------------------------------------------------ the model
class XLoraModel(AdapterModel):
    """Experts (LoRA adapters of this AdapterModel, all active) + ``internal_xlora_classifier``.

    Only the head trains, unless ``use_trainable_adapters``. ``latest_scalings`` holds the
    scalings of the last call, (batch, seq, layers, experts); ``expert_names`` their order.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                 expert_dirs: dict[str, Path] | None = None) -> None:
        nn.Module.__init__(self)
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.method_state = {}
        self.targets: dict[str, list[str]] = {}
        self._method = get_method("lora")
        self._active: list[str] = []
        self._adapters_disabled = False
        self._in_scaling_pass = False
        self._scalings: Tensor | None = None
        self.latest_scalings: Tensor | None = None
        self.scalings_log: list[Tensor] | None = None
        """A list to append every call's scalings to (on the CPU), or None (the default)."""
        self.xlora_name = adapter_name
        self.xlora_config = config
        base_config = getattr(model, "config", None)
        if getattr(base_config, "is_encoder_decoder", False):
            raise UserInputError(
                "X-LoRA runs on decoder-only causal LMs (its gating reads one hidden state per input token, as "
                "PEFT's does); use a causal-lm task, or LoRA for encoder-decoder models"
            )
        if getattr(base_config, "use_cache", False):
            base_config.use_cache = False  # PEFT requires it: cached tokens would keep stale scalings
        self.hidden_size = _hidden_size(model, config)
        dirs = expert_dirs if expert_dirs is not None else resolve_experts(config.adapters)
        if not dirs:
            raise UserInputError("X-LoRA needs at least one expert: set adapter.adapters to {name: path, ...}")
        if adapter_name in dirs:
            raise UserInputError(f"an X-LoRA expert may not be named {adapter_name!r}, the X-LoRA adapter's own name; "
                                 "rename the expert in adapters")
        trainable = config.use_trainable_adapters and not config.inference_mode
        for name, folder in dirs.items():
            expert = read_expert_config(folder)
            if isinstance(expert, str):
                raise UserInputError(f"X-LoRA expert {name!r} {expert}")
            _check_random_base(name, folder, model)
            expert.inference_mode = not trainable
            try:
                self.add_adapter(name, expert)
                self._load_weights(folder, name)
            except (UserInputError, AdapterStateError) as exc:
                wrapped = AdapterStateError if isinstance(exc, AdapterStateError) else UserInputError
                raise wrapped(f"X-LoRA expert {name!r} ({folder}): {exc}") from None
        self.expert_names = list(dirs)
        self.peft_config[adapter_name] = config  # as PEFT's PeftModel: {"default": the X-LoRA config}
        layers = [(path, layer) for path, layer in self.adapter_layers()]
        for path, layer in layers:
            if not isinstance(layer, LoraLayer) or layer.kind not in GATED_KINDS or layer.lora_variant:
                raise UserInputError(
                    f"X-LoRA expert layer {path} is a {type(layer.base_layer).__name__}; X-LoRA gates LoRA on Linear, "
                    "GPT-2 Conv1D and Embedding layers: train the experts without that module"
                )
        weight = next(model.parameters())
        dtype = torch.float32 if weight.dtype in HALF_DTYPES else weight.dtype
        self.internal_xlora_classifier = XLoraClassifier(
            config, self.hidden_size, len(self.expert_names), len(layers), dtype, weight.device)
        for index, (_, layer) in enumerate(layers):
            layer.batch_adapters = _ExpertGate(self, index)
        self._hook = model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)
        self.set_adapter(self.expert_names)

    @property
    def active_adapter(self) -> str:
        """The X-LoRA adapter's name (``active_adapters`` are its experts, all active)."""
        return self.xlora_name

    # ------------------------------------------------------------ forward
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise UserInputError("adapter_names (one adapter per row) is not for X-LoRA, whose head picks the experts "
                                 "per token; leave it out")
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["use_cache"] = False  # every step re-reads the whole sequence, as in PEFT
        return self.base_model.generate(*args, **kwargs)

    def _scaling_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the base model: the pass with dummy scalings, then the head."""
        if self._in_scaling_pass or self._adapters_disabled:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if not isinstance(tokens, Tensor) or tokens.dim() < 2:
            raise UserInputError("X-LoRA needs input_ids or inputs_embeds of shape (batch, seq) to gate its experts")
        head = self.internal_xlora_classifier
        self._scalings = head.dummy(tokens.shape[0], tokens.shape[1], tokens.device)
        pass_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        pass_kwargs.update(output_hidden_states=True, return_dict=True, use_cache=False)
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                hidden = module(*args, **pass_kwargs).hidden_states[-1]
        finally:
            self._in_scaling_pass = False
        self._scalings = head(hidden)
        self.latest_scalings = self._scalings
        if self.scalings_log is not None:
            self.scalings_log.append(self._scalings.detach().to("cpu"))
        return None

    def _gated_forward(self, layer: nn.Module, index: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Base output plus each expert's LoRA update weighted per token (weight 1 without scalings)."""
        result = layer.base_layer(x, *args, **kwargs)
        scalings, weights = self._scalings, None
        if scalings is not None:
            weights = self.internal_xlora_classifier.layer_weights(scalings, index)
            if weights.shape[:2] != result.shape[:2]:
                raise LoraCliError(
                    f"X-LoRA scalings are for {tuple(weights.shape[:2])} (batch, seq) but a LoRA layer got "
                    f"{tuple(result.shape[:2])}; call the model on the whole sequence"
                )
            weights = weights * self.xlora_config.global_scaling_weight
        for i, name in enumerate(self.expert_names):
            if name not in layer.r:
                continue
            update = layer.add_update(torch.zeros_like(result), x, name)
            result = result + (update if weights is None else update * weights[..., i : i + 1].to(update.dtype))
        return result

    # ------------------------------------------------------------ trainable / state
    def _set_trainable(self) -> None:
        super()._set_trainable()
        head = getattr(self, "internal_xlora_classifier", None)
        if head is not None:
            head.requires_grad_(not self.xlora_config.inference_mode)

    def adapter_parameters(self, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
        if adapter_name in (None, self.xlora_name):
            yield from self.internal_xlora_classifier.parameters()
            for name in self.expert_names:
                if not self.peft_config[name].inference_mode:
                    yield from super().adapter_parameters(name)
            return
        yield from super().adapter_parameters(adapter_name)

    def live_adapter_tensors(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The head (PEFT's keys) and the trainable experts (``xlora_experts.<name>.``); an
        expert's name gives that expert's plain LoRA tensors."""
        if adapter_name not in (None, self.xlora_name):
            return super().live_adapter_tensors(adapter_name)
        out = {HEAD_KEY + k: v for k, v in self.internal_xlora_classifier.state_dict(keep_vars=True).items()}
        for name in self.expert_names:
            if not self.peft_config[name].inference_mode:
                out.update({f"{EXPERT_KEY}{name}.{k}": v for k, v in super().live_adapter_tensors(name).items()})
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor], adapter_name: str | None = None) -> None:
        if adapter_name not in (None, self.xlora_name):
            return super().load_adapter_state_dict(state, adapter_name)
        head = {k[len(HEAD_KEY):]: v for k, v in state.items() if k.startswith(HEAD_KEY)}
        experts: dict[str, dict[str, Tensor]] = {}
        other = []
        for key, value in state.items():
            if key.startswith(EXPERT_KEY):
                name, _, rest = key[len(EXPERT_KEY):].partition(".")
                experts.setdefault(name, {})[rest] = value
            elif not key.startswith(HEAD_KEY):
                other.append(key)
        live = self.internal_xlora_classifier.state_dict()
        missing = sorted(set(live) - set(head))
        problems = []
        if missing:
            problems.append(f"the gating head lacks {', '.join(HEAD_KEY + k for k in missing)} (PEFT 0.21's save drops "
                            "head tensors whose name holds '.0.', '.1.', ...: save the model with loracli, or write "
                            "every internal_xlora_classifier tensor of the PEFT model yourself)")
        shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(live[k].shape)}" for k, v in head.items()
                  if k in live and live[k].shape != v.shape]
        if shapes or set(head) - set(live):
            problems.append("the head does not fit this config (" + "; ".join(shapes or sorted(set(head) - set(live)))
                            + "): xlora_depth, xlora_size, layerwise_scalings and the experts must match the file")
        if other or set(experts) - set(self.expert_names):
            problems.append(f"unexpected tensors {sorted(other + list(set(experts) - set(self.expert_names)))[:3]}")
        if problems:
            raise AdapterStateError("the X-LoRA adapter does not fit this model: " + "; ".join(problems))
        self.internal_xlora_classifier.load_state_dict(head)
        for name, tensors in experts.items():
            super().load_adapter_state_dict(tensors, name)

    # ------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        state_dict: dict[str, Tensor] | None = None, **kwargs: Any) -> None:
        """PEFT's X-LoRA folder: the head at the root, each expert as a LoRA folder in ``<name>/``."""
        root = Path(save_directory)
        state = dict(state_dict) if state_dict is not None else self.get_adapter_state_dict()
        for name in self.expert_names:  # the experts' live tensors (a gathered state_dict is used for the head)
            AdapterStateMixin.save_pretrained(self, root, selected_adapters=[name], **kwargs)
        config = copy.deepcopy(self.xlora_config)
        config.adapters = {str(i): str((root / name).resolve()) for i, name in enumerate(self.expert_names)}
        config.hidden_size = self.hidden_size
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path", None) or None
        save_adapter_files(root, {k: v for k, v in state.items() if k.startswith(HEAD_KEY)}, config)

    @classmethod
    def from_pretrained(cls, model: nn.Module | str | os.PathLike | None = None,
                        model_id: str | os.PathLike | None = None, adapter_name: str = "default",
                        is_trainable: bool = False, **base_kwargs: Any) -> XLoraModel:
        if model_id is None and isinstance(model, (str, os.PathLike)):
            model, model_id = None, model
        if model_id is None:
            raise UserInputError("from_pretrained needs the X-LoRA folder: from_pretrained([base_model,] folder)")
        root = Path(model_id)
        config = AdapterConfig.from_pretrained(root)
        if config.peft_type != "XLORA":
            raise UserInputError(f"{root / CONFIG_NAME} is a {config.method} adapter, not X-LoRA; load it with "
                                 "lora_cli.adapters.load_adapter_model")
        if model is None:
            model = load_base_model(config, root, **base_kwargs)
        config.inference_mode = not is_trainable
        instance = cls(model, config, adapter_name, expert_dirs=saved_experts(config, root))
        instance.load_adapter_state_dict(read_adapter_weights(root))  # the head; the experts came from their folders
        if not is_trainable:
            instance.eval()
        return instance

    # ------------------------------------------------------------ refused / scalings
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise UserInputError(MERGE_REFUSAL)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        raise UserInputError(MERGE_REFUSAL)

    def unload(self) -> nn.Module:
        self._hook.remove()
        for _, layer in self.adapter_layers():
            layer.batch_adapters = None
        return super().unload()

    _FIXED = ("an X-LoRA model's experts are fixed when it is built (its head has one output per expert, and every "
              "expert is active); list the experts you want in the config's adapters and build it again")

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if hasattr(self, "internal_xlora_classifier"):
            raise UserInputError(self._FIXED)
        super().add_adapter(adapter_name, config)

    def delete_adapter(self, adapter_name: str) -> None:
        raise UserInputError(self._FIXED)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        raise UserInputError(f"{self._FIXED}. X-LoRA runs do not combine (loracli combine): combine their LoRA "
                             "expert runs instead, or compose more experts in one X-LoRA recipe")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if hasattr(self, "internal_xlora_classifier") and sorted(names) != sorted(self.expert_names):
            raise UserInputError(self._FIXED)
        super().set_adapter(names)

    def token_scalings(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token expert weights (batch, seq, layers, experts) for ``batch``, as the
        experts' LoRA layers apply them (top-k and its softmax included, before ``global_scaling_weight``)."""
        with torch.no_grad():
            self(**batch)
        head = self.internal_xlora_classifier
        return torch.stack([head.layer_weights(self.latest_scalings, k) for k in range(head.n_layers)], dim=2)


def _check_random_base(name: str, folder: Path, model: nn.Module, keys: int = 3) -> None:
    """An expert from a loracli run whose base was built from model.config (random weights,
    kept in the run's ``base_model/``) must have been trained on these very weights."""
    file = folder.parent / "base_model" / "model.safetensors"
    if folder.name != RUN_ADAPTER_DIR or not file.is_file():
        return
    live = model.state_dict()
    with safe_open(file, framework="pt") as saved:
        shared = [k for k in saved.keys() if k in live][:keys]  # noqa: SIM118 - safe_open is not iterable
        same = all(torch.equal(saved.get_tensor(k), live[k].detach().cpu().to(saved.get_tensor(k).dtype))
                   for k in shared)
    if shared and not same:
        raise UserInputError(
            f"X-LoRA expert {name!r} ({folder.parent}) was trained on another base model: its run's base_model/ "
            "(random weights built from model.config) differs from this model's. The experts and the X-LoRA run "
            f"must share one base: set the X-LoRA recipe's model.name_or_path to {folder.parent / 'base_model'}"
        )


def _hidden_size(model: nn.Module, config: AdapterConfig) -> int:
    base = getattr(getattr(model, "config", None), "hidden_size", None)
    given = config.hidden_size
    if given is not None and base is not None and given != base:
        raise UserInputError(
            f"adapter.hidden_size is {given} but the base model's hidden size is {base}; remove hidden_size "
            "(loracli reads it from the model) or set it to the model's"
        )
    size = given if given is not None else base
    if size is None:
        raise UserInputError("X-LoRA cannot tell this model's hidden size; set adapter.hidden_size")
    return int(size)
