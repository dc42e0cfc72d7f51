"""One module per task, each a :class:`Task` (``base.py``), found through ``task_kinds``.

``image_classification``, ``causal_lm``, ``seq_cls`` and ``seq2seq`` implement the same
interface; their functions take the recipe sections they use, never the whole recipe.
``quantization`` loads a ``model.quantization`` base; the data machinery the tasks share
(sources and splits, image decoding and batches, text, chat and packing) is :mod:`lora_cli.tasks.data`.
"""

from __future__ import annotations

import importlib
from typing import cast

from lora_cli.errors import UserInputError
from lora_cli.task_kinds import TASK_KINDS, TASKS
from lora_cli.tasks.base import Collate, Task

__all__ = ["Collate", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The module that implements task ``name`` (a recipe's ``task:``)."""
    kind = TASK_KINDS.get(name)
    if kind is None:
        raise UserInputError(f"task {name!r} is unknown; choose one of {', '.join(TASKS)}")
    return cast(Task, importlib.import_module(f"{__name__}.{kind.module}"))
