"""One module per task, all of the same shape.

A task module provides: NAME, PEFT_TASK_TYPE, load_raw(recipe) -> (Splits, labels or None),
load_processor(recipe, source=None), build_model(recipe, labels, source=None), heads(model),
prepare(splits, processor, recipe) -> (train_ds, eval_ds), collate(batch),
compute_metrics(eval_pred), eval_dataset(recipe, processor, split, limit), synthetic_batch(processor, n).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lora_cli.errors import UserInputError

TASKS = {
    "image-classification": "lora_cli.tasks.image_classification",
    "causal-lm": "lora_cli.tasks.causal_lm",
    "seq-cls": "lora_cli.tasks.seq_cls",
    "seq2seq": "lora_cli.tasks.seq2seq",
}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise UserInputError(f"task {name!r} is unknown; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def task_collator(task: ModuleType, processor, recipe):
    """The task's collate function: text tasks build one around their tokenizer (pad id)."""
    make = getattr(task, "make_collator", None)
    return make(processor, recipe) if make is not None else task.collate
