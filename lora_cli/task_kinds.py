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
    metrics: tuple[str, ...] = ("loss",)
    """What every evaluation during training reports (the Trainer adds the ``eval_`` prefix): the
    loss and the task's ``compute_metrics``. ``training.metric_for_best_model`` and tune's pruner
    read these, so they are checked against this list before any work."""
    final_metrics: tuple[str, ...] = ()
    """What only the final evaluation adds (``eval.json``): tune's ``--metric`` may name these too."""

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
        TaskKind(IMAGE_CLASSIFICATION, "image_classification", "images", labels=True, peft_task_type=None,
                 metrics=("loss", "accuracy"), final_metrics=("macro_f1", "top_k_accuracy")),
        TaskKind(CAUSAL_LM, "causal_lm", "text", labels=False, peft_task_type="CAUSAL_LM",
                 metrics=("loss", "perplexity", "token_nll")),
        TaskKind(SEQ_CLS, "seq_cls", "text", labels=True, peft_task_type="SEQ_CLS",
                 metrics=("loss", "accuracy", "f1_macro"), final_metrics=("macro_f1", "top_k_accuracy")),
        TaskKind(SEQ2SEQ, "seq2seq", "text", labels=False, peft_task_type="SEQ_2_SEQ_LM",
                 metrics=("loss", "token_accuracy"), final_metrics=("bleu",)),
    )
}
TASKS: tuple[str, ...] = tuple(TASK_KINDS)
TIMING_METRICS = ("runtime", "samples_per_second", "steps_per_second")
"""What the Trainer's every evaluation also reports, about its speed."""
TEXT_TASKS: tuple[str, ...] = tuple(k.name for k in TASK_KINDS.values() if k.inputs == "text")
