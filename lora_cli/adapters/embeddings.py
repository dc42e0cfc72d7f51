"""The base embeddings an adapter file may carry (PEFT's ``save_embedding_layers``).

A file may carry the base weights of the input / output embedding
(``...embed_tokens.base_layer.weight`` when the embedding is targeted, ``...embed_tokens.weight``
and ``lm_head.weight`` when the vocabulary was resized): the rows a resize added are random, and
only the file can bring them back. :mod:`lora_cli.adapters.state` copies them into the base on
load and writes them where PEFT's "auto" would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.modules_to_save import ModulesToSaveWrapper
from lora_cli.adapters.targeting import candidate_modules, matches

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
"""PEFT's names: targeting one of them makes save_embedding_layers="auto" save the embeddings."""


def embedding_base_tensors(model: nn.Module) -> dict[str, tuple[Tensor, nn.Module]]:
    """The base tensors of the model's input and output embeddings under PEFT's file keys (no
    prefix), each with the module that holds them: ``P.weight`` for a plain module,
    ``P.base_layer.weight`` (``P.token_adapter.base_layer.weight`` beside LoRA's trainable
    tokens) for a wrapped one. A ``modules_to_save`` copy is saved as itself and not listed."""
    out: dict[str, tuple[Tensor, nn.Module]] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        if module is None or isinstance(module, ModulesToSaveWrapper):
            continue
        path = next((p for p, m in model.named_modules() if m is module), None)
        if path is None:
            continue
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        prefix = f"{path}.{module.base_key}." if isinstance(module, AdapterLayer) else f"{path}."
        for name, param in base.named_parameters(recurse=False):
            out[prefix + name] = (param, module)
    return out


def embedding_shape_problem(key: str, file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> str:
    return (f"{key}: the file carries this base embedding with {file_shape[0]} rows {file_shape}, the model "
            f"has {model_shape[0]} {model_shape}; resize the model's token embeddings first "
            f"(model.resize_token_embeddings({file_shape[0]}), as the tokenizer saved with the adapter does)")


def saved_embedding_layers(model: nn.Module, config: AdapterConfig, choice: bool | str) -> dict[str, Tensor]:
    """The embedding base tensors that ``save_pretrained(save_embedding_layers=choice)`` writes (PEFT's rules)."""
    targeted = _names_an_embedding_layer(model, config.target_modules)
    if choice == "auto":
        tokens = config.peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None)
        choice = (targeted and not tokens) or _vocabulary_resized(model, config.base_model_name_or_path)
    if not choice:
        return {}
    out: dict[str, Tensor] = {}
    for key, (tensor, module) in embedding_base_tensors(model).items():
        if targeted and not isinstance(module, AdapterLayer):
            continue  # PEFT: with an embedding targeted, only the adapted embeddings are written
        out[key] = tensor.detach().to("cpu").clone()  # a copy: tied embeddings share one tensor
    return out


def _names_an_embedding_layer(model: nn.Module, rule: Any) -> bool:
    if isinstance(rule, str):
        if rule == "all-linear":
            return False
        return any(matches(path, rule) for path in candidate_modules(model)
                   if path.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)
    return bool(rule) and any(name in rule for name in EMBEDDING_LAYER_NAMES)


def _vocabulary_resized(model: nn.Module, base: str | None) -> bool:
    """Whether the input embedding's rows differ from the vocabulary of the local base folder ``base``."""
    path = Path(base) / "config.json" if base else None
    if path is None or not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    vocab = saved.get("vocab_size") or (saved.get("text_config") or {}).get("vocab_size")
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(vocab, int) or embedding is None:
        return False
    weight = embedding.base_weight() if isinstance(embedding, AdapterLayer) else getattr(embedding, "weight", None)
    return isinstance(weight, Tensor) and weight.shape[0] != vocab
