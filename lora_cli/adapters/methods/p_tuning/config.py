"""Prompt learning's settings: the fields every prompt-learning method shares, and p-tuning's
(PEFT's ``PromptEncoderConfig``, ``P_TUNING``). Imports no torch: the model fills in from the
base model what is left out (:meth:`PromptLearningConfig.completed`), duck-typed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lora_cli.adapters.checks import (
    MAX_DEPTH,
    MAX_WIDTH,
    check_choice,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.config import AdapterConfig
from lora_cli.errors import Problem

if TYPE_CHECKING:
    from torch import nn

TASKS = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM")
ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields every prompt-learning method shares (PEFT's names). The model fills the ones
    left None from the base model: token_dim, num_layers, num_attention_heads, and
    num_transformer_submodules (2 for seq2seq, else 1)."""

    task_types: ClassVar[tuple[str, ...] | None] = TASKS

    LAYER_FIELDS: ClassVar[tuple[str, ...]] = (
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    )
    """AdapterConfig fields about adapted layers: prompt learning adapts none."""
    merge_refusal: ClassVar[str | None] = (
        "has no weights to merge: it prepends learned virtual-token embeddings to every input and changes no "
        "layer of the base model. The adapter-only run is the deliverable: use it with `loracli predict --run RUN` "
        "and `loracli eval RUN`, or load RUN/adapter with peft.PeftModel.from_pretrained(base, folder)"
    )

    num_virtual_tokens: int | None = None
    """How many virtual tokens are prepended (e.g. 20)."""
    token_dim: int | None = None
    """Width of the base model's word embeddings; filled in from the model."""
    num_transformer_submodules: int | None = None
    """1, or 2 for seq2seq (PEFT keeps a second block of tokens that p-tuning leaves unused)."""
    num_attention_heads: int | None = None
    """The base model's attention heads (recorded, as PEFT does); filled in from the model."""
    num_layers: int | None = None
    """The base model's layers (recorded, as PEFT does); filled in from the model."""

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        """The number of virtual tokens it prepends."""
        n = saved.get("num_virtual_tokens")
        return f"{n} virtual tokens" if isinstance(n, int) and not isinstance(n, bool) else "-"

    def problems(self) -> list[Problem]:
        out = super().problems()
        for name in self.LAYER_FIELDS:
            value = getattr(self, name)
            if value not in (None, {}, []):
                out.append(Problem(name, f"does not apply to {self.method}: it prepends virtual tokens and adapts no "
                                         "layer", value, hint="remove it"))
        if self.num_virtual_tokens is None:
            out.append(Problem("num_virtual_tokens", "is required", None, hint="e.g. num_virtual_tokens: 20"))
        else:
            out += check_positive_int("num_virtual_tokens", self.num_virtual_tokens, maximum=MAX_WIDTH)
        for name, most in (("token_dim", MAX_WIDTH), ("num_attention_heads", MAX_WIDTH), ("num_layers", MAX_DEPTH)):
            if getattr(self, name) is not None:
                out += check_positive_int(name, getattr(self, name), maximum=most)
        if self.num_transformer_submodules not in (None, 1, 2):
            out.append(Problem("num_transformer_submodules", "must be 1 or 2", self.num_transformer_submodules,
                               hint="leave it out: loracli picks 2 for seq2seq models, 1 otherwise"))
        return out

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in self.LAYER_FIELDS:
            data.pop(name, None)
        return data

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def completed(self, model: nn.Module, token_dim: int) -> PromptLearningConfig:
        """This config with the fields left None filled in from ``model`` (PEFT's rules)."""
        cfg = getattr(model, "config", None)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

        def first(*names: str) -> int | None:
            for name in names:
                value = getattr(text, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return None

        changes: dict[str, Any] = {"token_dim": self.token_dim or token_dim}
        if self.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = 2 if self.task_type == "SEQ_2_SEQ_LM" else 1
        if self.num_layers is None:
            changes["num_layers"] = first("num_hidden_layers", "num_layers", "n_layer")
        if self.num_attention_heads is None:
            changes["num_attention_heads"] = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        return dataclasses.replace(self, **changes)


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's ``PromptEncoderConfig`` (``P_TUNING``)."""

    peft_type: ClassVar[str] = "P_TUNING"
    method: ClassVar[str] = "p_tuning"
    display_name: ClassVar[str] = "P-tuning"

    encoder_reparameterization_type: str = "MLP"
    """MLP (recommended) or LSTM."""
    encoder_hidden_size: int | None = None
    """Width h of the encoder; None means the token dim."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has three Linear layers, as in PEFT)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers (the MLP has none, as in PEFT)."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder_reparameterization_type, str):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.upper()
        super().__post_init__()

    def problems(self) -> list[Problem]:
        out = super().problems()
        out += check_choice("encoder_reparameterization_type", self.encoder_reparameterization_type, ENCODER_TYPES)
        if self.encoder_hidden_size is not None:
            out += check_positive_int("encoder_hidden_size", self.encoder_hidden_size, maximum=MAX_WIDTH)
        out += check_positive_int("encoder_num_layers", self.encoder_num_layers, maximum=MAX_DEPTH)
        out += check_rate("encoder_dropout", self.encoder_dropout)
        return out

    def completed(self, model: nn.Module, token_dim: int) -> PromptEncoderConfig:
        done = super().completed(model, token_dim)
        if done.encoder_hidden_size is None:
            done.encoder_hidden_size = done.token_dim
        return done
