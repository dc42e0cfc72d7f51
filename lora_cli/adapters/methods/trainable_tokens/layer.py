"""Trainable tokens: retrain a few rows of an embedding matrix, the rest frozen (PEFT's
TRAINABLE_TOKENS method and LoRA's ``trainable_token_indices``).

    W' = W with rows idx replaced by V         V: (len(idx), dim), initialised to W[idx]
    y  = embedding(x, W')                      (a tied output layer: y = x W'^T)

Only V trains; gradients reach no other row. Merging writes V into W's rows and unmerging
writes the saved originals back, so both are exact and idempotent (PEFT's semantics:
values replace, they are not added). Alone, the adapter's file key is
``P.trainable_tokens_delta`` (V, despite the name); beside LoRA it is
``P.token_adapter.trainable_tokens_delta``.

Tied embeddings (a module whose weight IS the input embedding's: a tied output layer, or
T5's / BART's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` reading ``shared``): each
gets a layer that shares V with the embedding's, as PEFT does. PEFT saves that shared V
again under each tied layer's key for the method alone, and not at all beside LoRA; so do we.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters.combine import CombineError
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.kinds import EMBEDDING, LINEAR
from lora_cli.adapters.layers import AdapterLayer, layer_kind
from lora_cli.adapters.methods.trainable_tokens.config import INPUT_EMBEDDINGS
from lora_cli.adapters.model import AdapterModel
from lora_cli.adapters.targeting import candidate_modules, matches
from lora_cli.errors import LoraCliError, TargetingError, close_matches


class TrainableTokensLayer(AdapterLayer):
    """Rows ``token_indices[name]`` of an embedding (or of a tied output layer) replaced by V."""

    supported_kinds = (EMBEDDING, LINEAR)
    adapter_attrs = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        self.token_indices: dict[str, list[int]] = {}
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule, not saved twice
        if tied_to is not None:  # one V for both layers: the embedding's
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
            self.r = tied_to.r

    @property
    def tied_to(self) -> TrainableTokensLayer | None:
        return self._tied[0] if self._tied else None

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        if layer_kind(module) == EMBEDDING:
            return None
        return ("trainable tokens retrain rows of an embedding (nn.Embedding); target the input embedding "
                f"(target_modules: {INPUT_EMBEDDINGS}, or its module name), not this layer")

    def rows(self) -> int:
        return self.base_weight().shape[0]

    def add(self, name: str, config: Any, r: int, alpha: float, indices: list[int] | None = None,
            init: bool | None = None, key: str = "token_indices") -> None:
        indices = list(config.token_indices if indices is None else indices)
        init = config.init_weights if init is None else init
        if self.tied_to is not None:
            return  # follows the embedding's layer
        vocab = self.rows()
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise TargetingError(
                f"{key}: token id(s) {bad[:5]} are out of range for {type(self.base_layer).__name__} with vocab size "
                f"{vocab} (ids 0..{vocab - 1}); resize the model's embeddings to the tokenizer first "
                "(model.resize_token_embeddings(len(tokenizer))), or fix the ids"
            )
        weight = self.base_weight()
        with torch.no_grad():
            original = weight[torch.tensor(indices, device=weight.device)].detach().clone()
            values = original.clone() if init else torch.randn_like(original)
        self.token_indices[name] = indices
        self.r[name] = len(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(values.to(self.adapter_dtype()))
        self.register_buffer(f"_original_{name}", original, persistent=False)

    def original(self, name: str) -> Tensor:
        owner = self.tied_to or self
        return getattr(owner, f"_original_{name}")

    def adapter_tensors(self, name: str):
        if self.tied_to is None:
            return super().adapter_tensors(name)
        if not self.save_tied:
            return iter(())
        # PEFT writes the shared V again under this layer's key: a copy (files hold no shared storage;
        # loading fills the embedding's V from its own key)
        return ((key, param.detach().clone()) for key, param in super().adapter_tensors(name))

    save_tied: ClassVar[bool] = True
    """Whether a tied layer's shared V is written under its own key too (PEFT: alone yes, beside LoRA no)."""

    # ------------------------------------------------------------------ math
    def _index(self, name: str, device: torch.device) -> Tensor:
        return torch.tensor(self.token_indices[name], device=device)

    def adapted_weight(self, names: list[str]) -> Tensor:
        weight = self.base_weight()
        seen: set[int] = set()
        for name in names:
            ids = set(self.token_indices[name])
            if seen & ids:
                raise LoraCliError(
                    f"trainable-token adapters {names} share token id(s) {sorted(seen & ids)[:5]} on "
                    f"{type(self.base_layer).__name__}: which value wins is undefined (PEFT refuses it too); "
                    "activate one of them at a time"
                )
            seen |= ids
            weight = weight.index_copy(0, self._index(name, weight.device),
                                       self.trainable_tokens_delta[name].to(weight.dtype))
        return weight

    def get_delta_weight(self, name: str) -> Tensor:
        """What merging changes, as an additive delta in the canonical layout (V - W[idx] on those rows)."""
        weight = self.base_weight()
        delta = torch.zeros_like(weight)
        delta = delta.index_copy(0, self._index(name, weight.device),
                                 self.trainable_tokens_delta[name].to(weight.dtype) - weight[self._index(name, weight.device)])
        return delta.T if self.transposed else delta

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        weight = self.adapted_weight(names)
        base = self.base_layer
        if self.kind == LINEAR:  # a tied output layer
            return F.linear(x, weight, base.bias)
        out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
        return out * scale.to(out.dtype) if isinstance(scale, Tensor) else (out * scale if scale else out)

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        return None

    def factors(self, name: str):
        """No low-rank factors: add_weighted_adapter, which combines them, refuses such adapters."""
        raise CombineError(
            f"add_weighted_adapter combines LoRA factors, and the trainable tokens on {type(self.base_layer).__name__} "
            "have none; combine adapters without trainable_token_indices (or merge each one instead)"
        )

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        return self.delta_forward(x, [name]).to(result.dtype)

    @torch.no_grad()
    def merge_one(self, name: str, safe_merge: bool) -> None:
        weight = self.base_weight()
        idx = self._index(name, weight.device)
        self._write_weight(weight.index_copy(0, idx, self.trainable_tokens_delta[name].to(weight.dtype)), name,
                           safe_merge)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        weight = self.base_weight()
        weight.index_copy_(0, self._index(name, weight.device), self.original(name).to(weight.dtype))

    def redundant_keys(self, name: str) -> list[str]:
        # PEFT writes a tied layer's shared V again when it saves embedding layers with it
        if self.tied_to is None or self.save_tied:
            return []
        return [suffix for suffix, _ in super().adapter_tensors(name)]

    @torch.no_grad()
    def base_weight_loaded(self) -> None:
        if self.tied_to is not None:
            return  # the embedding's layer keeps the originals
        weight = self.base_weight()
        for name, indices in self.token_indices.items():
            if name not in self.merged_adapters:
                getattr(self, f"_original_{name}").copy_(weight[torch.tensor(indices, device=weight.device)])

    def extra_repr_for(self, name: str) -> str:
        tied = ", tied" if self.tied_to is not None else ""
        return f"tokens={len(self.token_indices.get(name, []))}{tied}"

    def delete(self, name: str) -> None:
        super().delete(name)
        if self.tied_to is None and hasattr(self, f"_original_{name}"):
            delattr(self, f"_original_{name}")


class TokenAdapterLayer(TrainableTokensLayer):
    """Trainable tokens beside LoRA (``trainable_token_indices``): PEFT's key infix ``token_adapter``."""

    disk_names = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}
    base_key = "token_adapter.base_layer"
    save_tied = False


# ------------------------------------------------------------------ placement
def input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, AdapterLayer):  # already wrapped; candidate_modules shows the base layer
        embedding = embedding.base_layer
    if embedding is not None:
        for path, module in candidate_modules(model).items():
            if module is embedding:
                return path
    found = [p for p, m in candidate_modules(model).items() if p.endswith("embed_tokens")]
    if found:
        return found[0]
    raise TargetingError(
        f"{type(model).__name__} has no get_input_embeddings() and no embed_tokens module; name the embedding to "
        "train (target_modules: [<module name>], or trainable_token_indices: {<module name>: [ids]})"
    )


def tied_paths(model: nn.Module, embedding_path: str) -> list[str]:
    """Modules whose weight IS the input embedding's weight: a tied output layer, and the other
    Embedding modules that share it (T5's and BART's ``encoder.embed_tokens`` and
    ``decoder.embed_tokens`` read ``shared``'s matrix). Each must see the trained rows, or the
    encoder reads the old ones. Sharing is checked by identity, not by config flags: a model
    that unties its weights shares nothing."""
    embedding = model.get_submodule(embedding_path)
    if isinstance(embedding, AdapterLayer):
        embedding = embedding.base_layer
    weight = embedding.weight
    return [p for p, m in candidate_modules(model).items()
            if p != embedding_path and layer_kind(m) in (EMBEDDING, LINEAR) and getattr(m, "weight", None) is weight]


def _resolve_one(model: nn.Module, name: str, key: str) -> str:
    modules = candidate_modules(model)
    hits = [p for p in modules if matches(p, [name])]
    if not hits:
        close = close_matches(name, sorted({p.rsplit(".", 1)[-1] for p in modules}), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise TargetingError(f"{key}: {name!r} matched no module of the model{hint}; name an embedding layer")
    return hits[0] if len(hits) == 1 else min(hits, key=len)


def place_token_layers(model: AdapterModel, adapter_name: str, targets: dict[str, tuple[str, list[int]]],
                       layer_cls: type[TrainableTokensLayer], init: bool) -> list[str]:
    """Wrap each path of ``targets`` ({path: (config key, ids)}), then the modules tied to the
    input embedding (:func:`tied_paths`); returns the paths that got the adapter."""
    base = model.base_model
    created: list[str] = []
    for path, (key, ids) in targets.items():
        module = base.get_submodule(path)
        if isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer):
            raise TargetingError(
                f"{key}: {path} is also in target_modules; a module gets either a LoRA adapter or trainable "
                "tokens, not both. Remove it from target_modules (or from the token settings)"
            )
        if not isinstance(module, TrainableTokensLayer):
            if layer_kind(module) not in (EMBEDDING, LINEAR):  # an output layer may be named too (PEFT)
                raise TargetingError(f"{key}: {path} ({type(module).__name__}): {layer_cls.refusal(module)}")
            module = layer_cls(module)
            base.set_submodule(path, module)
        module.add(adapter_name, None, 0, 0.0, indices=ids, init=init, key=key)
        created.append(path)
    try:
        source = input_embedding_path(base)
    except TargetingError:
        return created
    owner = base.get_submodule(source)
    if source not in targets or not isinstance(owner, TrainableTokensLayer):
        return created
    for path in tied_paths(base, source):
        if path in targets:
            continue  # named with its own ids: trained separately (PEFT: "treat as separate")
        module = base.get_submodule(path)
        if not isinstance(module, TrainableTokensLayer):
            module = layer_cls(module, tied_to=owner)
            base.set_submodule(path, module)
        created.append(path)
    return created


def inject_lora_tokens(model: AdapterModel, adapter_name: str, config: AdapterConfig, aliases: dict) -> list[str]:
    """LoRA's ``trainable_token_indices``: :class:`TokenAdapterLayer` s beside the LoRA layers."""
    spec = getattr(config, "trainable_token_indices", None)
    if not spec:
        return []
    key = "trainable_token_indices"
    if isinstance(spec, dict):
        targets = {_resolve_one(model.base_model, name, f"{key}[{name!r}]"): (f"{key}[{name!r}]", ids)
                   for name, ids in spec.items()}
    else:
        targets = {input_embedding_path(model.base_model): (key, spec)}
    saved = set(config.modules_to_save or [])
    for path, (where, _) in targets.items():
        if any(matches(path, [m]) for m in saved):
            raise TargetingError(
                f"{where}: {path} is also in modules_to_save (trained in full); use one of the two for it"
            )
    return place_token_layers(model, adapter_name, targets, TokenAdapterLayer, init=True)



class TrainableTokensModel(AdapterModel):
    """An :class:`AdapterModel` whose adapters are trainable tokens alone (``TRAINABLE_TOKENS``)."""

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if config.target_modules == INPUT_EMBEDDINGS:
            config = config.replace(target_modules=[input_embedding_path(self.base_model)])
        super().add_adapter(adapter_name, config)
        try:
            source = input_embedding_path(self.base_model)
        except TargetingError:  # a model without a known input embedding: nothing is tied
            return
        owner = self.base_model.get_submodule(source)
        if source in self.targets[adapter_name] and isinstance(owner, TrainableTokensLayer):
            for path in tied_paths(self.base_model, source):
                module = self.base_model.get_submodule(path)
                if not isinstance(module, TrainableTokensLayer):
                    self.base_model.set_submodule(path, TrainableTokensLayer(module, tied_to=owner))
        for _, layer in self.adapter_layers():
            layer.active_adapters = [n for n in self.active_adapters if n in layer.r]
        self._set_trainable()

