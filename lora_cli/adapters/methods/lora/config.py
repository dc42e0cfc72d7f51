"""LoRA's settings: :class:`LoraConfig`, with PEFT's field names and defaults (a file format).

Imports no torch, so a recipe is checked without it. What ``init_lora_weights`` may be, and
what each start's settings may hold, is :mod:`lora_cli.adapters.methods.lora.starts`'s table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lora_cli.adapters.checks import (
    MAX_RANK,
    check_choice,
    check_number,
    check_patterns,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.methods.lora import starts
from lora_cli.errors import Problem

BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings, with PEFT's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    on_quantized_base: ClassVar[bool] = True
    method: ClassVar[str] = "lora"
    display_name: ClassVar[str] = "LoRA"
    carried_names: ClassVar[dict[str, str | None]] = {"alpha": "lora_alpha", "init_r": "r"}

    r: int = 8
    """Rank of the update; higher captures more, costs more memory and compute."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """The base stores weights as (in, out); set automatically for GPT-2's Conv1D."""
    bias: str = "none"
    """Which biases train too: "none", "all", or "lora_only" (those of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r); keeps large ranks learning."""
    init_lora_weights: bool | str = True
    """True (B=0), False (random, non-zero delta), "gaussian", "pissa", "pissa_niter_N", "olora", "orthogonal"."""
    use_dora: bool = False
    """Weight-decomposed LoRA: learn a magnitude per output row."""
    lora_bias: bool = False
    """A trainable bias on lora_B, merged into the base bias (not with DoRA or SVD-based inits)."""
    # -- options of trainable tokens and parameter targets go below this line --
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose embedding rows train (the rest of the matrix stays frozen): a list for
    the input embedding, or {embedding module name: ids}. Modules tied to the embedding follow
    them (a tied output layer; T5's and BART's encoder and decoder embed_tokens)."""
    target_parameters: list[str] | None = None
    """nn.Parameter names (exact or dotted suffix, e.g. "mlp.experts.gate_up_proj") to adapt
    directly: how transformers 5 MoE experts, stored as 3-D (experts, ., .) tensors, get LoRA.
    On a 3-D parameter ``r`` is the rank of EACH expert (lora_A holds r * experts rows); PEFT's
    guidance is rank_pattern {"experts.gate_up_proj": max(1, r // num_experts)} to keep the
    budget of a dense layer. No dropout, DoRA, lora_bias or fan_in_fan_out there."""

    # -- options of the data-driven and quantization-aware inits go below this line --
    loftq_config: dict = field(default_factory=dict)
    """LoftQ settings (init_lora_weights: loftq): {loftq_bits: 2 | 4 | 8, loftq_iter: N}."""
    lora_ga_config: dict | None = None
    """LoRA-GA settings (init_lora_weights: lora_ga): direction ArB2r | A2rBr | ArBr | random,
    scale stable | weight_svd | gd_scale | unit, stable_gamma (16)."""
    eva_config: dict | None = None
    """EVA settings (init_lora_weights: eva): rho, tau, use_label_mask, label_mask_value, whiten, adjust_scaling_factors."""
    corda_config: dict | None = None
    """CorDA settings (init_lora_weights: corda): corda_method ipm|kpm, cache_file, covariance_file, ..."""

    @classmethod
    def shown_method(cls, saved: dict[str, Any]) -> str:
        return "dora" if saved.get("use_dora") else cls.method

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        return f"{saved.get('r')}/{saved.get('lora_alpha')}"

    def problems(self) -> list[Problem]:
        out = super().problems()
        out += check_positive_int("r", self.r, maximum=MAX_RANK)
        out += check_number("lora_alpha", self.lora_alpha)
        out += check_rate("lora_dropout", self.lora_dropout)
        out += check_choice("bias", self.bias, BIAS_CHOICES)
        out += check_patterns(self)
        out += _token_and_parameter_problems(self)
        out += starts.problems(self)
        init = self.init_lora_weights
        if not isinstance(self.lora_bias, bool):
            out.append(Problem("lora_bias", "must be true or false", self.lora_bias))
        elif self.lora_bias and (self.use_dora or not isinstance(init, bool)):  # PEFT 0.21 refuses both
            other = "cannot be combined with use_dora" if self.use_dora else f"needs init_lora_weights true or false, not {init!r}"
            out.append(Problem("lora_bias", other, True, hint="set lora_bias: false, or change the other option"))
        return out


def _token_and_parameter_problems(config: LoraConfig) -> list[Problem]:
    """trainable_token_indices and target_parameters: shapes of the values, and the options
    PEFT 0.21 refuses beside them (its ParamWrapper has no dropout, DoRA, lora_bias or
    fan_in_fan_out). AdaLoRA takes trainable tokens, as PEFT's does, but not
    target_parameters (PEFT 0.21's AdaLoRA fails on it with a TypeError)."""
    out: list[Problem] = []
    tokens, params = config.trainable_token_indices, config.target_parameters
    if config.peft_type != "LORA":
        if params:
            out.append(Problem("target_parameters", f"is not supported by {config.method} (only plain LoRA has it)",
                               params, hint="remove target_parameters, or use method: lora"))
            return out
        if config.peft_type != "ADALORA" and tokens:
            out.append(Problem("trainable_token_indices", f"is not supported by {config.method}", tokens,
                               hint="remove trainable_token_indices, or use method: lora or adalora"))
            return out

    def bad_ids(ids: object) -> bool:
        return not (isinstance(ids, list) and ids
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))

    if tokens is not None:
        if isinstance(tokens, dict):
            for name, ids in tokens.items():
                if not isinstance(name, str) or not name:
                    out.append(Problem("trainable_token_indices", "keys must be embedding module names", name))
                elif bad_ids(ids):
                    out.append(Problem(f"trainable_token_indices[{name!r}]", "must be a non-empty list of token ids >= 0",
                                       ids, hint="e.g. [32000, 32001]"))
            if not tokens:
                out.append(Problem("trainable_token_indices", "is an empty mapping", tokens,
                                   hint="give {embedding module: [token ids]}, or remove the key"))
        elif bad_ids(tokens):
            out.append(Problem("trainable_token_indices",
                               "must be a non-empty list of token ids >= 0, or {embedding module: [ids]}", tokens,
                               hint="e.g. [32000, 32001] for the input embedding"))
        elif isinstance(tokens, list) and len(set(tokens)) != len(tokens):
            out.append(Problem("trainable_token_indices", "lists a token id twice", tokens, hint="list each id once"))
    if params is not None:
        if isinstance(params, str) or not (isinstance(params, list) and all(isinstance(p, str) and p for p in params)):
            out.append(Problem("target_parameters", "must be a list of parameter names (regexes are not supported, "
                               "as in PEFT)", params, hint='e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]'))
        elif params:
            clashes = (("lora_dropout", bool(config.lora_dropout)), ("use_dora", config.use_dora is True),
                       ("lora_bias", config.lora_bias is True), ("fan_in_fan_out", config.fan_in_fan_out is True))
            for key, on in clashes:
                if on:
                    out.append(Problem(key, "cannot be combined with target_parameters (LoRA on an nn.Parameter "
                                       "folds the update into the tensor; PEFT refuses it too)", getattr(config, key),
                                       hint=f"remove {key}, or move these parameters to a separate adapter"))
    return out
