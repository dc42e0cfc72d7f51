"""The LyCORIS family's settings (arXiv:2309.14859): one base for the fields LoHa and LoKr
share, and each method's own. PEFT's field names and defaults; imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lora_cli.adapters.checks import (
    MAX_RANK,
    check_number,
    check_patterns,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.config import AdapterConfig
from lora_cli.errors import Problem


@dataclass
class LycorisConfig(AdapterConfig):
    """What LoHa and LoKr share: a rank, alpha / r scaling, rank and module dropout, Tucker cores."""

    carried_names: ClassVar[dict[str, str | None]] = {"lora_alpha": "alpha", "init_r": "r"}

    r: int = 8
    """Rank of the low-rank factors (LoHa's update can reach r squared)."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Probability, in training, of zeroing each output row of the update."""
    module_dropout: float = 0.0
    """Probability, in training, of skipping the whole adapter of a layer for one step."""
    use_effective_conv2d: bool = False
    """Tucker-decomposed kernels for Conv2d / Conv1d kernels larger than 1 (fewer parameters)."""

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        return f"{saved.get('r')}/{saved.get('alpha')}"

    def problems(self) -> list[Problem]:
        out = super().problems()
        out += check_positive_int("r", self.r, maximum=MAX_RANK)
        out += check_number("alpha", self.alpha)
        out += check_rate("rank_dropout", self.rank_dropout)
        out += check_rate("module_dropout", self.module_dropout)
        if not isinstance(self.use_effective_conv2d, bool):
            out.append(Problem("use_effective_conv2d", "must be true or false", self.use_effective_conv2d))
        return out + check_patterns(self)


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa settings (low-rank Hadamard product; kept rows of rank dropout are always rescaled)."""

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"
    display_name: ClassVar[str] = "LoHa"

    init_weights: bool = True
    """True: w2_b = 0, so training starts at the base model; False: all random (tests)."""

    def problems(self) -> list[Problem]:
        out = super().problems()
        if not isinstance(self.init_weights, bool):
            out.append(Problem("init_weights", "must be true or false", self.init_weights))
        return out


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr settings (low-rank Kronecker product; ``r`` is the rank of w2, and of w1 with decompose_both)."""

    peft_type: ClassVar[str] = "LOKR"
    method: ClassVar[str] = "lokr"
    display_name: ClassVar[str] = "LoKr"

    decompose_both: bool = False
    """Also factor w1 into w1_a @ w1_b when r < max(out_l, in_m) / 2."""
    decompose_factor: int = -1
    """Split dims as (factor, dim / factor) when factor divides them; -1: near sqrt(dim)."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank_dropout by 1 / (fraction kept)."""
    init_weights: bool | str = True
    """True: w1 = 0 (training starts at the base model); "lycoris": w2 = 0; False: all random."""

    def problems(self) -> list[Problem]:
        out = super().problems()
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            out.append(Problem("init_weights", "must be one of true, false, 'lycoris'", self.init_weights))
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
            out.append(Problem("decompose_factor", "must be -1 (automatic) or an integer >= 1", factor))
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                out.append(Problem(name, "must be true or false", getattr(self, name)))
        return out
