"""The one table of tasks: each task's recipe name and what the other layers need to know.

It sits at the bottom of the package so that every layer reads it: the recipe validates
``task:`` against it, the run directory knows which runs keep a label map, ``tasks`` finds
the module that implements each one, and the verbs choose their inputs by modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TaskKind:
    name: str
    """The recipe's ``task:`` value."""
    module: str
    """The module under ``lora_cli.tasks`` that implements it (a :class:`lora_cli.tasks.Task`)."""
    inputs: Literal["images", "text"]
    """What the model reads: image tasks take a processor, text tasks a tokenizer."""
    labels: bool
    """Classification: the run keeps a label map, the head is sized from it."""
    peft_task_type: str | None
    """PEFT's ``task_type`` for the saved adapter (PEFT has none for image classification)."""

    @property
    def unit(self) -> str:
        """What one training example is called in progress lines."""
        return "images" if self.inputs == "images" else "samples"


IMAGE_CLASSIFICATION = "image-classification"
CAUSAL_LM = "causal-lm"
SEQ_CLS = "seq-cls"
SEQ2SEQ = "seq2seq"

TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind(IMAGE_CLASSIFICATION, "image_classification", "images", labels=True, peft_task_type=None),
        TaskKind(CAUSAL_LM, "causal_lm", "text", labels=False, peft_task_type="CAUSAL_LM"),
        TaskKind(SEQ_CLS, "seq_cls", "text", labels=True, peft_task_type="SEQ_CLS"),
        TaskKind(SEQ2SEQ, "seq2seq", "text", labels=False, peft_task_type="SEQ_2_SEQ_LM"),
    )
}
TASKS: tuple[str, ...] = tuple(TASK_KINDS)
CLASSIFICATION_TASKS: tuple[str, ...] = tuple(k.name for k in TASK_KINDS.values() if k.labels)
TEXT_TASKS: tuple[str, ...] = tuple(k.name for k in TASK_KINDS.values() if k.inputs == "text")
