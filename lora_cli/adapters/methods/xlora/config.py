"""X-LoRA: a mixture of frozen LoRA experts gated per token (Buehler & Buehler, arXiv:2402.07148).

    g = softmax(MLP(h) / T)          h: the base model's last hidden state (a pass without experts)
    y_l = W_l x + w * sum_e g_le s_e B_e A_e x                  w: global_scaling_weight

The experts are existing LoRA adapters (folders or loracli runs) given by ``adapters``;
only the gating head trains (``use_trainable_adapters`` trains the experts too). The model
lives in :mod:`lora_cli.adapters.methods.xlora.model`; this file holds the config and its checks
(no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lora_cli.adapters.checks import (
    MAX_DEPTH,
    MAX_WIDTH,
    check_number,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.methods.xlora.experts import EXPERT_NAME, expert_folder, read_expert_config
from lora_cli.errors import Problem

MERGE_REFUSAL = (
    "an X-LoRA adapter cannot be merged into the base weights: its gating head weights each expert per token from "
    "the input's hidden states, so no single weight update equals it (PEFT cannot merge X-LoRA either). Use the "
    "run as it is (loracli eval RUN, loracli predict --run RUN), or merge one expert run on its own "
    "(loracli merge <expert run>)"
)
TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
             "alpha_pattern", "modules_to_save")
"""AdapterConfig fields PEFT's XLoraConfig lacks: the experts already chose their layers."""


@dataclass
class XLoraConfig(AdapterConfig):
    """X-LoRA settings, with PEFT's field names and defaults (``hidden_size`` is read from the model)."""

    peft_type: ClassVar[str] = "XLORA"
    method: ClassVar[str] = "xlora"
    display_name: ClassVar[str] = "X-LoRA"
    task_types: ClassVar[tuple[str, ...] | None] = ("CAUSAL_LM",)
    LAYER_FIELDS: ClassVar[tuple[str, ...]] = TARGETING[:-1]
    """Inherited fields the recipe does not offer (modules_to_save stays: a task's head is refused by name)."""
    merge_refusal: ClassVar[str | None] = MERGE_REFUSAL.removeprefix("an X-LoRA adapter ")

    adapters: dict[str, str] = field(default_factory=dict)
    """The experts: {name: LoRA adapter folder or loracli run directory}, in the head's order."""
    hidden_size: int | None = None
    """Hidden size of the base model (the head's input); left out, it is read from the model."""
    enable_softmax: bool = True
    """Softmax over the experts' logits (off: the raw logits weight the experts)."""
    enable_softmax_topk: bool = False
    """Softmax over only the top_k_lora kept experts (use instead of enable_softmax)."""
    layerwise_scalings: bool = False
    """One set of expert weights per LoRA layer instead of one shared by all layers."""
    xlora_depth: int = 1
    """Linear layers in the head; 1 is a single projection."""
    xlora_size: int = 2048
    """Width of the head's hidden layers (unused when xlora_depth is 1); larger costs memory."""
    xlora_dropout_p: float = 0.2
    """Dropout between the head's layers (unused when xlora_depth is 1)."""
    use_trainable_adapters: bool = False
    """Train the experts too (by default they stay frozen and only the head trains)."""
    softmax_temperature: float = 1.0
    """Lower gives sharper expert choices."""
    top_k_lora: int | None = None
    """Keep only the k highest-weighted experts per token (sparse); null keeps all."""
    scaling_pass_value: float = 0.0
    """Every expert's weight in the scaling pass that feeds the head (0: the plain base model)."""
    global_scaling_weight: float = 1.0
    """Multiplies every expert's weighted update."""

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        """The number of LoRA experts it mixes."""
        experts = saved.get("adapters")
        return f"{len(experts)} experts" if isinstance(experts, dict) else "-"

    def problems(self) -> list[Problem]:
        out = super().problems()
        for name in TARGETING:
            if getattr(self, name) not in (None, {}, []):
                out.append(Problem(name, "is not an X-LoRA setting: its experts already chose the layers they adapt",
                                   getattr(self, name), hint="remove it (a task that trains a new head needs lora)"))
        out += self._expert_problems()
        if self.hidden_size is not None:
            out += check_positive_int("hidden_size", self.hidden_size, maximum=MAX_WIDTH)
        out += check_positive_int("xlora_depth", self.xlora_depth, maximum=MAX_DEPTH)
        out += check_positive_int("xlora_size", self.xlora_size, maximum=MAX_WIDTH)
        out += check_rate("xlora_dropout_p", self.xlora_dropout_p)
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            out += check_number(name, getattr(self, name))
        if check_number("softmax_temperature", self.softmax_temperature) == [] and self.softmax_temperature <= 0:
            out.append(Problem("softmax_temperature", "must be > 0", self.softmax_temperature, hint="e.g. 1.0"))
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            if not isinstance(getattr(self, name), bool):
                out.append(Problem(name, "must be true or false", getattr(self, name)))
        if self.top_k_lora is not None:
            n = len(self.adapters) if isinstance(self.adapters, dict) else 0
            if isinstance(self.top_k_lora, bool) or not isinstance(self.top_k_lora, int) or not 1 <= self.top_k_lora <= max(n, 1):
                out.append(Problem("top_k_lora", f"must be an integer from 1 to the number of experts ({n})",
                                   self.top_k_lora, hint="or null to weight every expert"))
        elif self.enable_softmax_topk:
            out.append(Problem("enable_softmax_topk", "needs top_k_lora", True, hint="set top_k_lora, or turn it off"))
        return out

    def _expert_problems(self) -> list[Problem]:
        """A config being written (not one read back from a saved folder, whose paths the loader
        resolves against its sub-folders) must name existing LoRA experts of this base."""
        if not isinstance(self.adapters, dict) or not self.adapters:
            return [Problem("adapters", "must map each expert's name to its LoRA adapter folder or run directory",
                            self.adapters, hint="e.g. adapters: {code: runs/code-lora, math: runs/math-lora}")]
        out = []
        for name, path in self.adapters.items():
            key = f"adapters[{name!r}]"
            if not isinstance(name, str) or not EXPERT_NAME.fullmatch(name) or name == "default":
                out.append(Problem(key, "is not a usable expert name (it names a sub-folder of the saved adapter)",
                                   name, hint="letters, digits, '_', '-', '.', and not 'default'"))
            if not isinstance(path, str) or not path:
                out.append(Problem(key, "must be a path", path))
            elif not self.inference_mode:
                out += self._check_expert(key, path)
        return out

    def _check_expert(self, key: str, path: str) -> list[Problem]:
        folder = expert_folder(path)
        if isinstance(folder, str):
            return [Problem(key, folder, path)]
        expert = read_expert_config(folder)
        if isinstance(expert, str):
            return [Problem(key, expert, path)]
        ours, theirs = _base_id(self.base_model_name_or_path), _base_id(expert.base_model_name_or_path)
        if ours and theirs and ours != theirs:
            return [Problem(key, f"was trained on base model {expert.base_model_name_or_path}, not "
                                 f"{self.base_model_name_or_path}", path,
                            hint="experts must share the X-LoRA run's base model: set model.name_or_path to theirs")]
        return []

    def to_dict(self) -> dict[str, Any]:
        """PEFT's XLoraConfig keys only (it has no targeting fields)."""
        data = super().to_dict()
        return {k: v for k, v in data.items() if k not in TARGETING}


def _base_id(name: str | None) -> str | None:
    if not name:
        return None
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name.rstrip("/")

