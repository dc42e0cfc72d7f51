"""The interface every task module implements, and the table that finds them.

A task is a module (``image_classification``, ``causal_lm``, ``seq_cls``, ``seq2seq``)
that satisfies :class:`Task`; ``lora_cli.task_kinds`` is the one table of task names.
Each function takes the recipe sections it uses (``data``, ``model``, the seed), never
the whole recipe, and knows no Trainer and no verb.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lora_cli.recipe import DataSection, ModelSection
from lora_cli.task_kinds import TaskKind
from lora_cli.tasks.data.common import Splits

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


@runtime_checkable
class Task(Protocol):
    """data -> processor -> model -> prepared datasets -> collate -> metrics, for one task."""

    KIND: TaskKind
    """Its row in ``task_kinds.TASK_KINDS``: name, inputs, labels, PEFT task type."""

    preprocess_logits_for_metrics: Callable[[Any, Any], torch.Tensor] | None
    """Shrinks eval logits before the Trainer gathers them (None: keep them)."""

    generation_metrics: Callable[..., dict[str, float]] | None
    """``(model, processor, data, seed, split, limit, predictions=None) -> metrics`` that need
    generation (BLEU, chrF): too slow for every evaluation, so ``train`` runs it once at the end and
    ``eval`` once; a ``predictions`` list receives each row's input, reference and prediction. None
    when the task has none."""

    device_inputs: Callable[[Any], Callable[[dict[str, Any]], dict[str, Any]]] | None
    """``processor -> (batch -> batch)`` that finishes a compact batch on the model's device
    (normalising uint8 pixels on the GPU), or None when batches need no finishing."""


    def load_raw(self, data: DataSection, seed: int) -> tuple[Splits, list[str] | None]:
        """The train/eval rows as the source has them, and the label names (None without labels)."""

    def load_processor(self, model: ModelSection, source: str | Path | None = None) -> Any:
        """The image processor or tokenizer; ``source`` is a run's saved copy."""

    def build_model(self, model: ModelSection, labels: list[str] | None, source: str | Path | None = None) -> torch.nn.Module:
        """The base model (head sized for ``labels``); ``source`` is a run's saved base_model/."""

    def heads(self, model: torch.nn.Module) -> list[str]:
        """Top-level modules with new weights, trained in full and saved with the adapter."""

    def prepare(self, splits: Splits, processor: Any, data: DataSection, seed: int) -> tuple[Any, Any]:
        """The train and eval datasets the Trainer reads."""

    def make_collator(self, processor: Any, data: DataSection | None = None, compact: bool = False) -> Collate:
        """Rows -> one batch of tensors. ``compact``: leave the inputs in their transport form
        (uint8 pixels), for :attr:`device_inputs` to finish on the model's device."""

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        """The Trainer's eval predictions -> metrics."""

    def eval_dataset(self, data: DataSection, seed: int, processor: Any, split: str = "validation",
                     limit: int | None = None) -> Any:
        """One split prepared for evaluation (`loracli eval`, merge checks), ``limit`` rows at most."""

    def predict(self, run: Any, inputs: list[Any], *, top_k: int = 5, batch_size: int = 16,
                max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None) -> list[Any]:
        """`loracli predict`: one result per input, in input order, for a loaded run (or merged model).

        Image tasks take file paths (one ``FilePrediction`` per file, a bad file gets its own
        error); text tasks take texts (``{"text", "top_k": [{label, score}]}`` for a classifier,
        ``{"text", "generated"}`` for generation). Options a task has no use for are ignored."""

    def synthetic_batch(self, processor: Any, n: int = 4) -> dict[str, torch.Tensor]:
        """Random inputs of the right shape, when no data is reachable."""


def generated_rows(generate: Callable[..., list[str]], run: Any, texts: list[str], max_new_tokens: int | None,
                   temperature: float | None, top_p: float | None) -> list[dict[str, Any]]:
    """``predict`` of a generative task: ``{"text", "generated"}`` per text (the task's default length
    unless ``max_new_tokens`` is given)."""
    kwargs: dict[str, Any] = {"temperature": temperature, "top_p": top_p}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    return [{"text": t, "generated": g} for t, g in zip(texts, generate(run, list(texts), **kwargs), strict=True)]
