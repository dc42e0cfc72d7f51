"""Trainer callbacks: AdaLoRA's budget step, the metrics file, rich progress, NaN guard,
the not-learning check, and the training loop's time, throughput and peak memory (train.json)."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from transformers import TrainerCallback

from lora_cli.errors import LoraCliError
from lora_cli.evaluation import learning
from lora_cli.evaluation.compare import TRAIN_STATS_FILE
from lora_cli.progress import Field, LiveLine, clock
from lora_cli.rundir import STATUS_FILE, write_json, write_status


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocation after each optimizer step.

    The importance scores need gradients: ``on_optimizer_step`` runs after backward and
    before ``zero_grad``; ``on_step_end`` would see zeroed gradients and silently prune
    nothing (the bug PEFT's own Trainer path has).
    """

    def __init__(self, model) -> None:
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.update_and_allocate(state.global_step)


class MetricsFileCallback(TrainerCallback):
    """Appends every log/eval event to metrics.jsonl (one JSON object per line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")


class NanGuardCallback(TrainerCallback):
    """Stops the run with a clear failure when the loss becomes NaN/inf."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise LoraCliError(
                f"the training loss became {loss} at step {state.global_step}; "
                "lower training.learning_rate or enable gradient clipping (training.max_grad_norm)"
            )


class LearningCheckCallback(TrainerCallback):
    """One warning when a classification run is not learning (:mod:`lora_cli.evaluation.learning`):
    after the first epoch (which still carries the start), an epoch whose training loss is at or
    above ``ln(num_classes)`` or has risen since the epoch before, or an evaluation at chance
    accuracy; and a final evaluation at chance once the run has trained at least one epoch (a
shorter one, e.g. a few ``max_steps``, is not judged). The line goes to the
    terminal (``warnings``) and into status.json's ``not_learning``; the run goes on."""

    def __init__(self, num_classes: int, learning_rate: float | None, run_dir: Path | None = None,
                 hint: str | None = None) -> None:
        self.num_classes = num_classes
        self.learning_rate = learning_rate
        self.run_dir = run_dir
        self.hint = hint
        self.losses: list[tuple[float, float]] = []  # (epoch, logged loss)
        self.previous: float | None = None
        self.line: str | None = None
        self.ended = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and math.isfinite(loss):
            self.losses.append((state.epoch or 0.0, float(loss)))

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch or 0.0)
        loss = learning.epoch_loss([v for e, v in self.losses if epoch - 1 < e <= epoch])
        if loss is None:
            return
        if epoch >= 2:
            self._report(state, learning.loss_evidence(epoch, loss, self.previous, self.num_classes))
        self.previous = loss

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = True  # the evaluation after training is the run's result: checked whatever its epoch

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        accuracy = (metrics or {}).get("eval_accuracy")
        epoch = state.epoch or 0.0
        # a run judged at its end must have seen its data once: a few-step smoke run (max_steps) at
        # chance says nothing about its learning rate
        if accuracy is None or epoch < 1 - 1e-6 or not (self.ended or epoch >= 2 - 1e-6):
            return
        self._report(state, learning.accuracy_evidence(float(accuracy), self.num_classes,
                                                       when=f"at epoch {state.epoch:.3g}"))

    def _report(self, state, evidence: str | None) -> None:
        if evidence is None or self.line is not None or not state.is_world_process_zero:
            return
        self.line = learning.not_learning_line(evidence, self.learning_rate, self.hint)
        warnings.warn(self.line, stacklevel=2)
        if self.run_dir is not None and (Path(self.run_dir) / STATUS_FILE).is_file():
            write_status(self.run_dir, "running", not_learning=self.line)


class RichProgressCallback(TrainerCallback):
    """The training line: steps done/total, elapsed, time left, loss, learning rate, accuracy and
    throughput, cut to the console's width (:func:`lora_cli.progress.fit`). On a terminal it
    redraws in place; in a log it prints a line when training starts, at every evaluation, at
    most every ``every`` seconds between, and when it ends."""

    def __init__(self, console: Console | None = None, samples_per_step: int = 1, unit: str = "samples",
                 every: float = 30.0) -> None:
        self.console = console or Console(stderr=True)
        self.samples_per_step = samples_per_step
        self.unit = unit
        self.every = every
        self.line: LiveLine | None = None
        self.summary = {"loss": None, "lr": None, "acc": None}
        self.start = self.last_end = 0.0
        self.first_end: float | None = None
        self.start_step = self.step = self.total = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start, self.start_step = time.perf_counter(), state.global_step
        self.step, self.total = state.global_step, state.max_steps
        self.first_end = None
        self.line = LiveLine(self.fields, self.console, every=self.every)
        first = f"train: {self.total:,d} steps of {self.samples_per_step:,d} {self.unit}"
        self.line.open(first + (f", resumed at step {self.step:,d}" if self.step else ""))

    def fields(self) -> list[Field]:
        elapsed = time.perf_counter() - self.start
        per_step = self._seconds_per_step()
        left = per_step * (self.total - self.step) if per_step else None
        loss, lr, acc = self.summary["loss"], self.summary["lr"], self.summary["acc"]
        return [
            Field("train", 0),
            Field(f"{self.step:,d}/{self.total:,d}", 0),
            Field("", 7, bar=self.step / self.total if self.total else 0.0),
            Field(clock(elapsed), 2),
            Field("" if self.step >= self.total else f"eta {clock(left)}" if left is not None else "eta ?", 1),
            Field(f"loss {loss:.4f}" if loss is not None else "", 3),
            Field(f"lr {lr:.1e}" if lr is not None else "", 6),
            Field(f"acc {acc:.3f}" if acc is not None else "", 4),
            Field(f"{self.samples_per_step / per_step:.1f} {self.unit}/s" if per_step else "", 5),
        ]

    def _seconds_per_step(self) -> float | None:
        """From the steps after the first (which carries the start-up: workers, the first batch),
        measured at step ends, so the estimate holds still between steps."""
        done = self.step - self.start_step
        if done >= 2 and self.first_end is not None and self.last_end > self.first_end:
            return (self.last_end - self.first_end) / (done - 1)
        if done >= 1 and self.first_end is not None:
            return max(self.first_end - self.start, 1e-9)
        return None

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.last_end = time.perf_counter()
        if self.first_end is None:
            self.first_end = self.last_end
        if self.line is not None:
            self.line.note()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.summary["loss"] = logs["loss"]
        if "learning_rate" in logs:
            self.summary["lr"] = logs["learning_rate"]
        if "eval_accuracy" in logs:
            self.summary["acc"] = logs["eval_accuracy"]
        self.step = state.global_step
        if self.line is not None:
            self.line.note(force=any(k.startswith("eval_") for k in logs))

    def on_train_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.close()

    def close(self) -> None:
        """End the line (also when training stops with an exception: the terminal gets its cursor back)."""
        if self.line is not None:
            self.line.close()
            self.line = None


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): CUDA's peak allocated memory on this process's device when training on
    CUDA (``cuda_max_allocated``), else the process's peak resident set size (``peak_rss``:
    ``ru_maxrss``, kilobytes on Linux, bytes on macOS)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "peak_rss"


class TrainStatsCallback(TrainerCallback):
    """Writes train.json when training ends: wall time of the training loop (evaluations and
    checkpoints during it included), samples seen, samples per second, peak memory, and the
    trainable-parameter counts. A resumed run records the part it trained."""

    def __init__(self, run_dir: Path, n_train: int, samples_per_step: int) -> None:
        self.path = Path(run_dir) / TRAIN_STATS_FILE
        self.n_train = n_train
        self.samples_per_step = samples_per_step
        self.start, self.start_step, self.start_epoch = 0.0, 0, 0.0
        self.params: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        if model is not None and hasattr(model, "get_nb_trainable_parameters"):
            trainable, total = model.get_nb_trainable_parameters()
            self.params = {"trainable_params": trainable, "all_params": total,
                           "trainable_percent": 100 * trainable / total if total else 0.0}
        self.start, self.start_step, self.start_epoch = time.perf_counter(), state.global_step, state.epoch or 0.0

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        wall = time.perf_counter() - self.start
        steps = state.global_step - self.start_step
        if steps == 0 and self.path.is_file():
            return  # resumed at its last step (a final evaluation that failed): keep the record of the training
        epochs = (state.epoch or 0.0) - self.start_epoch
        # epochs x rows counts a short last batch right; steps x batch is the fallback
        samples = round(epochs * self.n_train) if epochs > 0 and self.n_train else steps * self.samples_per_step
        memory, kind = peak_memory()
        write_json(self.path, {
            "wall_time_s": round(wall, 3),
            "optimizer_steps": steps,
            "resumed_from_step": self.start_step,
            "train_samples": samples,
            "samples_per_second": round(samples / wall, 3) if wall > 0 else None,
            "peak_memory_bytes": memory,
            "peak_memory_kind": kind,
            "device": "cuda" if kind == "cuda_max_allocated" else "cpu",
            **self.params,
        })
