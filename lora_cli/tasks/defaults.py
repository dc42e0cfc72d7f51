"""Default target modules per architecture, for recipes that leave target_modules out.

PEFT's table for the common text models, plus ViT (which PEFT lacks): attention query and
value projections, the layers the LoRA paper adapts. Old (transformers 4) names work on
transformers 5 through the engine's name aliases.
"""

from __future__ import annotations

DEFAULT_TARGETS = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "vit": ["query", "value"],
    "deit": ["query", "value"],
}


def default_target_modules(model) -> list[str] | None:
    """The model type's default target modules; None when loracli has none for it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = DEFAULT_TARGETS.get(model_type)
    return list(targets) if targets is not None else None
