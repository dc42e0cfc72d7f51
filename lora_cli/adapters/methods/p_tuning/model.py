"""Prompt learning: trained virtual-token embeddings in front of a frozen text model's input.

    prompts  = encoder(arange(T))                       # (T, dim), T = n * num_transformer_submodules
    embeds   = [prompts[:n] ; word_embeddings(ids)]     # (batch, n + seq, dim)
    mask     = [1 ... 1 ; attention_mask]               # n ones in front
    labels   = [-100 ... -100 ; labels]                 # causal LM only: no loss on virtual tokens

No layer of the base model changes; the method supplies only the encoder (p-tuning: an MLP or
LSTM over a small embedding table, :mod:`lora_cli.adapters.methods.p_tuning.encoder`). Per task, as
PEFT does: sequence classification also pads ``token_type_ids`` with zeros; causal LM and
seq2seq drop them; ``position_ids`` are dropped (the model numbers the longer sequence
itself); seq2seq prepends to the encoder only, its decoder and labels stay as they are.

On disk (PEFT's format) the adapter is the encoder's *output*, ``prompt_embeddings``
(T, dim), plus any ``modules_to_save`` head as ``base_model.<path>.<param>``. Loaded for
inference the encoder is just that table. Checkpoints for ``--resume`` keep the raw encoder
tensors (``prompt_encoder.*``, see :meth:`PromptLearningModel.live_adapter_tensors`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.methods.p_tuning.config import TASKS, PromptLearningConfig
from lora_cli.adapters.methods.p_tuning.encoder import PromptEncoder
from lora_cli.adapters.model import AdapterModel
from lora_cli.adapters.modules_to_save import ModulesToSaveWrapper
from lora_cli.adapters.registry import get_method
from lora_cli.adapters.state import fit_problems, save_adapter_files
from lora_cli.adapters.targeting import module_aliases, resolve_modules_to_save
from lora_cli.errors import AdapterStateError, UserInputError
from lora_cli.hf_names import context_length

FILE_KEY = "prompt_embeddings"
"""PEFT's one key for a prompt-learning adapter: the virtual-token embeddings, (T, dim)."""
HEAD_PREFIX = "base_model."
"""PEFT's prefix for modules_to_save tensors of prompt learning (no ``.model`` infix)."""
RAW_PREFIX = "prompt_encoder."
IGNORE_INDEX = -100
_SEQ_CLS_HEADS = ("classifier", "score")
"""Heads PEFT trains for sequence classification where the model has them."""


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The base model's token embedding table (the one input_ids index)."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(table, nn.Embedding):
        return table
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for module in model.modules():  # PEFT's fallback: the embedding of vocabulary size
        if isinstance(module, nn.Embedding) and vocab is not None and module.num_embeddings == vocab:
            return module
    raise UserInputError(
        f"prompt learning prepends virtual tokens to a text model's word embeddings, and {type(model).__name__} has "
        "none (an image or audio model?); use a layer method such as adapter.method: lora for it"
    )


class PromptLearningModel(AdapterModel):
    """An :class:`AdapterModel` whose adapters are prompt encoders instead of wrapped layers.

    Live names are PEFT's (``prompt_encoder.default.mlp_head.0.weight``); the base model is
    untouched but for ``modules_to_save`` heads. One adapter is active at a time.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        nn.Module.__init__(self)
        self.base_model = model
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.method_state = {}
        self.targets: dict[str, list[str]] = {}
        self.prompt_encoder = nn.ModuleDict()
        self._method = get_method(config.peft_type)
        self._active = [adapter_name]
        self._adapters_disabled = False
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if adapter_name in self.peft_config:
            raise UserInputError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if get_method(config.peft_type).name != self._method.name:
            raise UserInputError(f"this model holds {self._method.name} adapters; one model holds adapters of one method")
        table = word_embeddings(self.base_model)
        if config.task_type not in TASKS:
            raise UserInputError(
                f"{self._method.name} needs task_type {', '.join(TASKS)} (how the virtual tokens meet the labels "
                f"differs per task), got {config.task_type!r}; use it with the seq-cls, causal-lm or seq2seq task"
            )
        if config.token_dim is not None and config.token_dim != table.embedding_dim:
            raise UserInputError(
                f"{self._method.name}: token_dim {config.token_dim} does not match the model's word embeddings "
                f"({table.embedding_dim} wide); remove token_dim (it is read from the model) or fix it"
            )
        config = config.completed(self.base_model, table.embedding_dim)
        positions = context_length(getattr(self.base_model, "config", None))
        if positions is not None and config.num_virtual_tokens >= positions:  # before the encoder is made
            raise UserInputError(
                f"{self._method.name}: num_virtual_tokens {config.num_virtual_tokens} fills the model's whole context "
                f"({positions} positions), leaving no room for the text; use far fewer (e.g. 20)"
            )
        aliases = module_aliases(self.base_model)
        names = list(dict.fromkeys(config.modules_to_save or []))
        defaults = [h for h in _SEQ_CLS_HEADS if h not in names] if config.task_type == "SEQ_CLS" else []
        paths = resolve_modules_to_save(self.base_model, [n for n in names if n not in _SEQ_CLS_HEADS], aliases)
        for name in [n for n in names if n in _SEQ_CLS_HEADS] + defaults:  # PEFT's defaults: where present
            try:
                paths += resolve_modules_to_save(self.base_model, [name], aliases)
                if name not in names:
                    names.append(name)
            except UserInputError:
                if config.task_type != "SEQ_CLS":
                    raise
        config = dataclasses.replace(config, modules_to_save=names or None)
        encoder = self.build_encoder(config).to(table.weight.device)
        for path in dict.fromkeys(paths):
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                self.base_model.set_submodule(path, module)
            module.add(adapter_name)
        self.prompt_encoder[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        self.targets[adapter_name] = []
        self._set_trainable()

    def build_encoder(self, config: PromptLearningConfig) -> nn.Module:
        """The method's encoder: ``forward(indices (1, T)) -> (1, T, token_dim)``, with an ``embedding``
        table of T rows that holds the saved prompt in inference mode (p-tuning's :class:`PromptEncoder`)."""
        return PromptEncoder(config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        if not isinstance(adapter_name, str) and len(list(dict.fromkeys(adapter_name))) > 1:
            raise UserInputError(f"{self._method.name} adapters run one at a time; set_adapter one of {list(adapter_name)}")
        super().set_adapter(adapter_name if isinstance(adapter_name, str) else list(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.prompt_encoder[adapter_name]

    def adapter_parameters(self, adapter_name: str | None = None):
        name = adapter_name or self.active_adapter
        yield from self.prompt_encoder[name].parameters()
        for _, wrapper in self._wrappers():
            if name in wrapper.modules_to_save:
                yield from wrapper.modules_to_save[name].parameters()

    def _set_trainable(self) -> None:
        for param in self.prompt_encoder.parameters():
            param.requires_grad_(False)
        super()._set_trainable()

    # ------------------------------------------------------------------ prompts
    @property
    def active_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapter]

    @property
    def predicts_first_label(self) -> bool:
        """Causal LM: the last virtual token predicts labels[0], so every label is a target
        (a trainer normalising the loss counts all labels, not labels[1:])."""
        return self.active_config.task_type == "CAUSAL_LM" and not self._adapters_disabled

    def prompt_embeddings(self, adapter_name: str | None = None) -> Tensor:
        """(T, dim): the virtual tokens of one adapter (every block, as PEFT saves them)."""
        name = adapter_name or self.active_adapter
        encoder = self.prompt_encoder[name]
        indices = torch.arange(self.peft_config[name].total_virtual_tokens, device=encoder.embedding.weight.device)
        return encoder(indices.unsqueeze(0))[0]

    def _prompts(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        config = self.active_config
        prompts = self.prompt_embeddings()[: config.num_virtual_tokens]  # p-tuning uses the first block only
        return prompts.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def _drop_unsupported(self, kwargs: dict[str, Any], keep_token_types: bool) -> None:
        """PEFT's rules: position ids are dropped; token type ids too, except for classification."""
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored with virtual tokens: the model numbers the longer sequence itself",
                          stacklevel=3)
        kwargs.pop("position_ids", None)
        if not keep_token_types and kwargs.get("token_type_ids") is not None:
            warnings.warn(f"token_type_ids are ignored by {self._method.name} for task {self.active_config.task_type}",
                          stacklevel=3)
            kwargs.pop("token_type_ids", None)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise UserInputError(f"adapter_names (one adapter per row) is for layer methods, not {self._method.name}")
        if self._adapters_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        if input_ids is None and inputs_embeds is None:
            raise UserInputError("forward needs input_ids or inputs_embeds")
        config = self.active_config
        task, n = config.task_type, config.num_virtual_tokens
        self._drop_unsupported(kwargs, keep_token_types=task == "SEQ_CLS")
        if inputs_embeds is None:
            inputs_embeds = word_embeddings(self.base_model)(input_ids)
        batch = inputs_embeds.shape[0]
        if attention_mask is not None:
            attention_mask = _prefixed(attention_mask, n, 1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = _prefixed(token_types, n, 0)
        if labels is not None and task == "CAUSAL_LM":
            labels = _prefixed(labels, n, IGNORE_INDEX)
        inputs_embeds = torch.cat((self._prompts(batch, inputs_embeds.dtype), inputs_embeds), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self._adapters_disabled:
            return self.base_model.generate(*args, **kwargs)
        task = self.active_config.task_type
        if args:  # generate(input_ids) as transformers allows
            kwargs["input_ids"], args = args[0], args[1:]
        if kwargs.get("input_ids") is None:
            raise UserInputError(f"generate with a {self._method.name} adapter needs input_ids (the virtual tokens go in "
                                 "front of their embeddings); pass the tokenizer's input_ids instead of inputs_embeds")
        if task == "SEQ_2_SEQ_LM":
            return self._generate_seq2seq(*args, **kwargs)
        if task != "CAUSAL_LM":
            raise UserInputError(f"generate is for causal_lm and seq2seq runs; this {self._method.name} adapter is {task}")
        self._drop_unsupported(kwargs, keep_token_types=False)
        base = self.base_model
        original = base.prepare_inputs_for_generation

        def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:  # these names: generate inspects them
            return self._prepare_step(original(*args, **kwargs))

        base.prepare_inputs_for_generation = prepare
        try:
            return base.generate(*args, **kwargs)
        finally:
            del base.prepare_inputs_for_generation  # the class's method again

    def _prepare_step(self, step: dict[str, Any]) -> dict[str, Any]:
        """One generation step of a causal LM: the prompt goes in at the first (prefill) step;
        every step's attention mask gets the virtual tokens' ones in front."""
        n = self.active_config.num_virtual_tokens
        ids = step.get("input_ids")
        cache = step.get("past_key_values", step.get("cache"))  # newer transformers models name it "cache"
        cached = 0 if cache is None else (cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2])
        if cached and ids is not None and cached >= ids.shape[1]:
            step["input_ids"] = ids = ids[:, -1:]
        mask = step.get("attention_mask")
        if isinstance(mask, dict) and len(mask) == 1:
            mask = next(iter(mask.values()))
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise AdapterStateError(
                    f"{self._method.name} generation needs a 2-D attention mask from {type(self.base_model).__name__}; "
                    "this model builds another kind, which loracli does not extend yet"
                )
            step["attention_mask"] = _prefixed(mask, n, 1)
        step.pop("position_ids", None)
        step.pop("cache_position", None)  # the model counts positions over the longer sequence
        if not cached:
            embeds = word_embeddings(self.base_model)(ids)
            step["inputs_embeds"] = torch.cat((self._prompts(embeds.shape[0], embeds.dtype), embeds), dim=1)
            step["input_ids"] = None
        return step

    def _generate_seq2seq(self, *args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.pop("input_ids")
        self._drop_unsupported(kwargs, keep_token_types=False)
        if kwargs.pop("encoder_outputs", None) is not None:
            warnings.warn("encoder_outputs are ignored: the encoder must see the virtual tokens", stacklevel=3)
        embeds = word_embeddings(self.base_model)(input_ids)
        kwargs["inputs_embeds"] = torch.cat((self._prompts(embeds.shape[0], embeds.dtype), embeds), dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _prefixed(kwargs["attention_mask"], self.active_config.num_virtual_tokens, 1)
        return self.base_model.generate(*args, **kwargs)

    # -------------------------------------------------------------- no merging
    def _refuse_merge(self, *args: Any, **kwargs: Any):
        raise UserInputError(f"{self._method.name} {self.active_config.merge_refusal}")

    merge_adapter = merge_and_unload = _refuse_merge

    def unmerge_adapter(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> nn.Module:
        """The base model without the virtual tokens (heads back to their originals)."""
        return self._unload(keep_heads=False)

    # ------------------------------------------------------------------- state
    def live_adapter_tensors(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The raw trainable tensors (for checkpoints): ``prompt_encoder.*`` and the heads."""
        name = adapter_name or self.active_adapter
        out = {f"{RAW_PREFIX}{k}": v for k, v in self.prompt_encoder[name].state_dict(keep_vars=True).items()}
        out.update(self._head_tensors(name))
        return out

    def _head_tensors(self, name: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, wrapper in self._wrappers():
            if name in wrapper.modules_to_save:
                for key, tensor in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                    out[f"{HEAD_PREFIX}{path}.{key}"] = tensor
        return out

    def peft_state_dict(self, adapter_name: str | None = None, raw: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """What PEFT saves: ``prompt_embeddings`` (the encoder's output, dropout off) and the heads.
        ``raw``: tensors in :meth:`live_adapter_tensors` layout to compute it from instead."""
        name = adapter_name or self.active_adapter
        encoder = self.prompt_encoder[name]
        heads = {k: v for k, v in (raw or {}).items() if k.startswith(HEAD_PREFIX)} if raw else self._head_tensors(name)
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                if raw is None:
                    prompts = self.prompt_embeddings(name)
                else:
                    params = {k[len(RAW_PREFIX):]: v for k, v in raw.items() if k.startswith(RAW_PREFIX)}
                    indices = torch.arange(self.peft_config[name].total_virtual_tokens).unsqueeze(0)
                    moved = {k: v.to(encoder.embedding.weight.device) for k, v in params.items()}
                    prompts = torch.func.functional_call(encoder, moved, (indices.to(encoder.embedding.weight.device),))[0]
        finally:
            encoder.train(was_training)
        state = {FILE_KEY: prompts}
        state.update(heads)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor], adapter_name: str | None = None) -> None:
        """PEFT's file layout (``prompt_embeddings`` + heads) or a checkpoint's raw layout."""
        name = adapter_name or self.active_adapter
        encoder = self.prompt_encoder[name]
        live = self.live_adapter_tensors(name)
        if FILE_KEY in state:
            live = {k: v for k, v in live.items() if not k.startswith(RAW_PREFIX)}
            live[FILE_KEY] = encoder.embedding.weight
            if len(list(encoder.children())) > 1:  # trainable: an MLP / LSTM on top of the table
                warnings.warn(
                    f"{self._method.name}: the adapter file holds the prompt embeddings only (what PEFT saves), so they "
                    "are loaded into the encoder's table and its MLP/LSTM starts afresh, as in PEFT: outputs differ "
                    "from the saved adapter until trained. To continue a run exactly, use `loracli train --resume`",
                    stacklevel=2,
                )
        seen: set[str] = set()
        unexpected, mismatched = [], []
        for key, tensor in state.items():
            target = live.get(key)
            if target is None and key.startswith("base_model.model."):  # a layer-method style head key
                target = live.get(HEAD_PREFIX + key[len("base_model.model."):])
            if target is None:
                unexpected.append(key)
                continue
            if target.shape != tensor.shape:
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
            target.data.copy_(tensor.to(dtype=target.dtype, device=target.device))
            seen.add(id(target))
        missing = [k for k, v in live.items() if id(v) not in seen]
        problems = fit_problems(mismatched, missing, unexpected)
        if problems:
            raise AdapterStateError(
                f"the {self._method.name} adapter does not fit this model ({'; '.join(problems)}); was it trained on a "
                "different base model, or with another num_virtual_tokens?"
            )

    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None,
                        state_dict: dict[str, Tensor] | None = None, convert_to_original_base: bool = False) -> None:
        """PEFT's layout: ``default`` at the root, other adapters in sub-folders.
        ``convert_to_original_base`` changes nothing here: no base weight is ever rewritten."""
        root = Path(save_directory)
        for name in selected_adapters or list(self.peft_config):
            raw = state_dict if state_dict is not None and name == self.active_adapter else None
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                base_config = getattr(self.base_model, "config", None)
                config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
            save_adapter_files(root if name == "default" else root / name, self.peft_state_dict(name, raw), config)


def _prefixed(tensor: Tensor, n: int, value: int) -> Tensor:
    """``tensor`` (batch, seq) with ``n`` columns of ``value`` in front."""
    front = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat((front, tensor), dim=1)
