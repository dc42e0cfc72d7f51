"""AdaLoRA's settings: :class:`AdaLoraConfig`, LoRA's fields plus the rank schedule (PEFT's names).

Imports no torch. The layer is :mod:`.layer`, the rank allocator :mod:`.state`; the method is
described at the top of :mod:`lora_cli.adapters.methods.adalora.layer`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from lora_cli.adapters.checks import MAX_RANK, check_positive_int
from lora_cli.adapters.methods.lora.config import LoraConfig
from lora_cli.errors import Problem


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings: LoRA's fields (``r`` unused, as in PEFT) plus the rank schedule."""

    peft_type: ClassVar[str] = "ADALORA"
    on_quantized_base: ClassVar[bool] = False
    method: ClassVar[str] = "adalora"
    display_name: ClassVar[str] = "AdaLoRA"
    shard_refusal: ClassVar[str | None] = (
        "AdaLoRA's rank allocator scores whole gradients, which FSDP and DeepSpeed split across processes")
    carried_names: ClassVar[dict[str, str | None]] = {"alpha": "lora_alpha", "r": None}

    target_r: int = 8
    """Average rank per module left after pruning."""
    init_r: int = 12
    """Rank every module starts with."""
    tinit: int = 0
    """Warm-up steps before any pruning."""
    tfinal: int = 0
    """Final steps that train the frozen, pruned ranks."""
    deltaT: int = 1
    """Prune every deltaT steps during the budgeting phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty added to the training loss."""
    total_step: int | None = None
    """Total optimizer steps of the run (required): the budget schedule spans it."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept ranks per module, {"<module path>.lora_E": [bool] * init_r}; written on save."""

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        return f"{saved.get('init_r')}->{saved.get('target_r')}/{saved.get('lora_alpha')}"

    @classmethod
    def derived_settings(cls, options: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        """init_r = r (LoRA's parameter count at the start) and target_r = 2r/3, from another method's ``r``."""
        rank = options.get("r")
        if isinstance(rank, bool) or not isinstance(rank, int) or {"init_r", "target_r"} & set(options):
            return {}
        return {"init_r": ("r", rank), "target_r": ("r", max(1, round(2 * rank / 3)))}

    def __post_init__(self) -> None:
        keep_none = self.rank_pattern is None
        if self.r != 8:
            warnings.warn("AdaLoRA ignores r; set init_r (start rank) and target_r (final average rank)", stacklevel=3)
        super().__post_init__()
        if keep_none:
            self.rank_pattern = None

    def problems(self) -> list[Problem]:
        out = [
            p for p in super().problems() if p.key != "init_lora_weights" and not p.key.startswith("rank_pattern[")
        ]
        out += check_positive_int("init_r", self.init_r, maximum=MAX_RANK)
        out += check_positive_int("target_r", self.target_r, allow_zero=True, maximum=MAX_RANK)
        out += check_positive_int("deltaT", self.deltaT)
        for name in ("tinit", "tfinal"):
            out += check_positive_int(name, getattr(self, name), allow_zero=True)
        total = self.total_step
        if total is None:
            out.append(Problem("total_step", "is required: the rank budget schedule spans the whole run", None,
                               hint="set it to the number of optimizer steps (epochs * steps per epoch)"))
        elif isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            out.append(Problem("total_step", "must be an integer > 0", total))
        elif all(type(getattr(self, n)) is int for n in ("tinit", "tfinal")) and self.tinit >= total - self.tfinal:
            out.append(Problem(
                "tinit",
                f"no budgeting phase: tinit ({self.tinit}) >= total_step ({total}) - tfinal ({self.tfinal}), "
                "so ranks would never be pruned",
                self.tinit,
                hint="lower tinit or tfinal, or raise total_step, so that tinit < total_step - tfinal",
            ))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                out.append(Problem(name, "must be a number in (0, 1)", value, hint="e.g. 0.85"))
        weight = self.orth_reg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            out.append(Problem("orth_reg_weight", "must be a number >= 0", weight, hint="0 disables the penalty"))
        if not isinstance(self.init_lora_weights, bool):
            out.append(Problem("init_lora_weights", "must be true or false for AdaLoRA", self.init_lora_weights))
        if self.use_dora:
            out.append(Problem("use_dora", "is not supported by AdaLoRA", True, hint="set use_dora: false"))
        if self.use_rslora:
            out.append(Problem("use_rslora", "has no meaning in AdaLoRA", True, hint="set use_rslora: false"))
        if self.lora_bias is True:
            out.append(Problem("lora_bias", "is not supported by AdaLoRA", True, hint="set lora_bias: false"))
        if self.alpha_pattern:
            out.append(Problem("alpha_pattern", "is not supported by AdaLoRA", self.alpha_pattern,
                               hint="remove it; lora_alpha applies to every module"))
        for key, mask in (self.rank_pattern or {}).items():
            if not (isinstance(mask, list) and all(isinstance(b, bool) for b in mask)):
                out.append(Problem(f"rank_pattern[{key!r}]", "must be a list of booleans (the kept ranks)", mask))
        return out
