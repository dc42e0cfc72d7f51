"""`loracli eval` minus printing: a run's adapter (or another, or none) scored on its recipe's data.

The recipe comes from the run's ``recipe.yaml``, so the run cannot be paired with the wrong
data; the model is rebuilt by :func:`lora_cli.inference.loading.load_run`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.errors import UserInputError
from lora_cli.evaluation import learning
from lora_cli.labels import require_labels
from lora_cli.recipe.shipped import known_rate

DEFAULT_EVAL_BATCH = 32
SPLITS = ("validation", "train")
"""What ``eval --split`` takes: any other name would silently evaluate the validation data."""


def _eval_batch_size(recipe: Any, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {requested}")
        return requested
    training = getattr(recipe, "training", None) or {}
    value = training.get("per_device_eval_batch_size") if isinstance(training, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_EVAL_BATCH


def eval_run(
    run_dir: str | Path,
    split: str = "validation",
    limit: int | None = None,
    adapter_dir: str | Path | None = None,
    base: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    write: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate the run's adapter (or ``adapter_dir``'s, or none with ``base``) on its data.

    Writes ``eval.json`` + ``plots/confusion_matrix.png`` for the run's own adapter on the
    validation split; variants get their own names (``eval_base.json``,
    ``eval_adapter-<dir>.json``, ``eval_train.json``) so they never overwrite it.
    """
    from lora_cli.evaluation.report import evaluate, evaluate_lm, write_report
    from lora_cli.inference.loading import load_run

    if split not in SPLITS:
        raise UserInputError(
            f"--split {split!r}: a run has the splits {', '.join(SPLITS)} (the recipe's training data and the "
            "validation data it trained against); pick one of them"
        )
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {limit}")
    if base and adapter_dir is not None:
        raise UserInputError("--base evaluates without any adapter; drop --adapter or --base")
    holder = rd.RunLock(Path(run_dir)).holder() if write else None
    if holder is not None:  # its final evaluation would race ours for eval.json
        raise UserInputError(f"{run_dir} is being trained right now ({holder}); evaluate it once that run ends")
    if write:  # the confusion matrix goes into plots/: never through a link out of the run
        rd.check_run_links(run_dir, (rd.PLOTS_DIR,))
    loaded = load_run(run_dir, adapter_dir=adapter_dir, device=device)
    recipe, task = loaded.recipe, loaded.task
    dataset = task.eval_dataset(recipe.data, recipe.seed, loaded.processor, split=split, limit=limit)
    size = _eval_batch_size(recipe, batch_size)
    collate = task.make_collator(loaded.processor, recipe.data)
    context = loaded.model.disable_adapter() if base else contextlib.nullcontext()
    with context:
        if loaded.id2label:
            report = evaluate(loaded.model, dataset, collate, require_labels(loaded.id2label, loaded.model, loaded.run_dir), size)
        else:  # generative tasks: loss, perplexity (and BLEU where the task has it)
            report = evaluate_lm(loaded.model, dataset, collate, size)
            if task.generation_metrics is not None:
                predictions: list[dict[str, Any]] = []
                report.update(task.generation_metrics(loaded.model, loaded.processor, recipe.data, recipe.seed,
                                                      split=split, limit=limit or 100, predictions=predictions))
                report["generations"] = predictions  # written beside the report: <name>_predictions.jsonl
    report["split"] = split
    report["limit"] = limit
    report["variant"] = "base" if base else ("adapter" if adapter_dir is None else str(adapter_dir))
    if not base and loaded.id2label and (adapter_dir is not None or _trained_an_epoch(loaded.run_dir)):
        _warn_if_at_chance(report, recipe)
    if not write:
        return report, {}
    name = "eval"
    if base:
        name += "_base"
    elif adapter_dir is not None:
        name += f"_adapter-{Path(adapter_dir).resolve().name}"
    if split != "validation":
        name += f"_{split}"
    return report, write_report(report, loaded.run_dir, name=name)


def _trained_an_epoch(run_dir: Path) -> bool:
    """Whether the run trained at least one epoch, as its metrics.jsonl records: `train` judges a final
    accuracy at chance only then (a smoke run of a few steps is not a collapse), and `eval` does the same.
    A run without the record (an adapter trained elsewhere) is judged."""
    from lora_cli.evaluation.plots import read_metrics

    path = Path(run_dir) / rd.METRICS_FILE
    if not path.is_file():
        return True
    epochs = [e["epoch"] for e in read_metrics(path) if isinstance(e.get("epoch"), (int, float))]
    return not epochs or max(epochs) >= 1 - 1e-6


def _warn_if_at_chance(report: dict[str, Any], recipe: Any) -> None:
    """The not-learning line of `train` for a finished run whose accuracy is at chance (the best
    constant guess on this split): a warning, and ``not_learning`` in the report."""
    supports = [row["support"] for row in report.get("per_class", [])]
    if "accuracy" not in report or len(supports) < 2 or not sum(supports):
        return
    majority = max(supports) / sum(supports)
    evidence = learning.accuracy_evidence(report["accuracy"], len(supports), majority)
    if evidence is None:
        return
    rate = (recipe.training or {}).get("learning_rate")
    line = learning.not_learning_line(evidence, float(rate) if rate is not None else None,
                                      known_rate(recipe.model.name_or_path, recipe.adapter.method))
    report["not_learning"] = line
    warnings.warn(line, stacklevel=2)
