"""Trainable tokens' settings: :class:`TrainableTokensConfig` (PEFT's ``TRAINABLE_TOKENS``); no torch.
The method is described at the top of :mod:`lora_cli.adapters.methods.trainable_tokens.layer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lora_cli.adapters.config import AdapterConfig
from lora_cli.errors import Problem

INPUT_EMBEDDINGS = "input-embeddings"
"""target_modules keyword (the default): the model's input embedding (``get_input_embeddings()``)."""


@dataclass
class TrainableTokensConfig(AdapterConfig):
    """Trainable tokens settings, with PEFT's field names and defaults."""

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    method: ClassVar[str] = "trainable_tokens"
    display_name: ClassVar[str] = "trainable tokens"
    peft_fields: ClassVar[frozenset[str]] = frozenset({
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
        "target_modules", "token_indices", "init_weights"})

    target_modules: list[str] | str | None = INPUT_EMBEDDINGS
    """The embedding(s) whose rows train; "input-embeddings" (the default) is the model's input embedding."""
    token_indices: list[int] = None  # type: ignore[assignment]
    """Token ids whose rows train, e.g. the ids of tokens just added to the tokenizer (required)."""
    init_weights: bool = True
    """True: start from the current rows (a no-op until trained). False: random rows (tests only)."""

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        """The number of token rows it trains."""
        ids = saved.get("token_indices")
        return f"{len(ids)} tokens" if isinstance(ids, list) else "-"

    def __post_init__(self) -> None:
        if self.target_modules is None:  # PEFT's files: null means the input embedding
            self.target_modules = INPUT_EMBEDDINGS
        super().__post_init__()

    def problems(self) -> list[Problem]:
        out = super().problems()
        ids = self.token_indices
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in ids)):
            out.append(Problem("token_indices", "must be a non-empty list of token ids >= 0", ids,
                               hint="e.g. token_indices: [32000, 32001] (the ids your tokenizer gives the tokens)"))
        elif len(set(ids)) != len(ids):
            out.append(Problem("token_indices", "lists a token id twice", ids, hint="list each id once"))
        if not isinstance(self.init_weights, bool):
            out.append(Problem("init_weights", "must be true or false", self.init_weights))
        for name in ("rank_pattern", "alpha_pattern"):
            if getattr(self, name):
                out.append(Problem(name, "has no meaning for trainable tokens (there is no rank)", getattr(self, name),
                                   hint=f"remove {name}"))
        return out
