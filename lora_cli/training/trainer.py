"""The transformers Trainer, taught to checkpoint an adapter instead of the whole model.

Checkpoints hold the adapter in PEFT format (usable as is) plus the raw, unsliced
adapter tensors (``adapter_state.safetensors``) that --resume and load_best_model_at_end
read back, next to the Trainer's optimizer / scheduler / RNG state.

A checkpoint is written into ``checkpoints/.incomplete/checkpoint-N`` and renamed to
``checkpoints/checkpoint-N`` only once every process has written all of its files, so a
crash or a full disk mid-save never leaves an incomplete checkpoint where --resume looks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from lora_cli import rundir as rd
from lora_cli.adapters import AdapterModel
from lora_cli.atomic import atomic_file, replace_dir
from lora_cli.errors import LoraCliError
from lora_cli.training import distributed

STATE_FILE = "adapter_state.safetensors"
STATE_EXTRA_FILE = "adapter_hooks.pt"  # method state beyond the tensors: AdaLoRA's rank allocator (name kept for old checkpoints)
SCHEDULER_FILE = "scheduler.pt"  # the name the Trainer reads back on --resume


def _adapter_model(trainer: Trainer) -> AdapterModel:
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if not isinstance(model, AdapterModel):
        raise LoraCliError(f"expected an AdapterModel inside the Trainer, found {type(model).__name__}")
    return model


def _save_method_state(model: AdapterModel, folder: Path) -> None:
    """So that --resume continues AdaLoRA's importance averages and masks, not restarts them."""
    states = {name: state.state_dict() for name, state in model.method_state.items() if hasattr(state, "state_dict")}
    if states:
        torch.save(states, folder / STATE_EXTRA_FILE)


def _load_method_state(model: AdapterModel, checkpoint: Path) -> None:
    file = checkpoint / STATE_EXTRA_FILE
    if not file.is_file():
        return
    for name, state in torch.load(file, map_location="cpu", weights_only=True).items():
        if name in model.method_state:
            model.method_state[name].load_state_dict(state)


def freeze_norm_statistics(model: torch.nn.Module) -> int:
    """Keep the frozen base's BatchNorm layers in eval mode during training; returns how many.

    A BatchNorm layer in train mode normalises with the batch's statistics and moves its running
    statistics towards them, although its weights are frozen. Those statistics are base buffers,
    not adapter tensors: the saved adapter could not reproduce the trained model (``eval``, merge
    and PEFT would see the base's original statistics). A frozen base keeps its statistics, so
    these layers run in eval mode at every forward; a BatchNorm that trains (``modules_to_save``)
    is left alone.
    """
    count = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                and not any(p.requires_grad for p in module.parameters())):
            module.register_forward_pre_hook(_in_eval_mode)
            count += 1
    return count


def _in_eval_mode(module: torch.nn.Module, args: Any) -> None:
    module.training = False


class AdapterTrainer(Trainer):
    input_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Finishes each batch once it is on the model's device (uint8 pixels -> normalised floats)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.model, "predicts_first_label", False):
            # prompt learning on a causal LM: the last virtual token predicts labels[0], so the
            # token count that normalises the loss covers every label, not labels[1:]
            self._loss_shifts_labels = False

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        return self.input_transform(inputs) if self.input_transform is not None else inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The task loss plus the adapter's regularizer (AdaLoRA's orthogonality penalty),
        weighted once per optimizer step whatever the number of processes and accumulation steps.

        Left in the model's forward, the penalty would be multiplied by the Trainer's loss
        scaling (x processes when the loss is normalised by the global item count, x
        accumulation steps), so 2 processes of batch b would not train as 1 of batch 2b.
        """
        # unwrapped already unless DDP / FSDP / torch.compile wraps it: accelerate's unwrap costs ~2 ms a step
        adapter = model if isinstance(model, AdapterModel) else _adapter_model(self)
        if adapter.active_adapter not in adapter.method_state or not adapter.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with adapter.loss_without_regularizer():
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        penalty = adapter.regularizer()  # None while the adapters are disabled
        if penalty is None:
            return result
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:  # the Trainer's own rule: it divides by the accumulation steps otherwise
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if scaled_for_ga:
            penalty = penalty / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        full = distributed.sharded_adapter_state(self)  # every process: gathering shards is collective
        if full is None:
            super().save_model(output_dir, _internal_call)
        elif self.args.should_save:
            self._write_adapter(output_dir, full)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        self._write_adapter(output_dir, None)

    def _write_adapter(self, output_dir: str | None, full_state: dict | None) -> None:
        """The adapter (PEFT format), its raw tensors and the training arguments.
        ``full_state``: gathered tensors of a sharded model, else None (read the live ones)."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = _adapter_model(self)
        model.save_pretrained(output_dir, state_dict=full_state)
        state = full_state if full_state is not None else model.get_adapter_state_dict()
        save_file(state, os.path.join(output_dir, STATE_FILE), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        _save_method_state(model, Path(output_dir))

    # ------------------------------------------------------------ atomic checkpoints
    _staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        final_root = Path(super()._get_output_dir(trial))
        name = f"{rd.CHECKPOINT_PREFIX}{self.state.global_step}"
        staging_root = final_root / rd.STAGING_DIR
        staged, final = staging_root / name, final_root / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by an earlier crash
            staging_root.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as exc:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
                with contextlib.suppress(OSError):
                    staging_root.rmdir()
            if isinstance(exc, OSError):  # a full disk, a quota, a vanished mount
                raise LoraCliError(
                    f"could not write checkpoint {name} in {final_root} ({exc}); the incomplete checkpoint was "
                    "removed. Free some space, then continue with `loracli train RECIPE --resume` (it resumes "
                    "from the newest complete checkpoint)"
                ) from exc
            raise
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its files
        if self.state.best_model_checkpoint == str(staged):
            self.state.best_model_checkpoint = str(final)
        if self.args.should_save:
            state_file = staged / "trainer_state.json"
            if state_file.is_file():  # it records best_model_checkpoint: point it at the final name
                with atomic_file(state_file) as tmp:
                    self.state.save_to_json(str(tmp))
            replace_dir(staged, final)
            with contextlib.suppress(OSError):  # other steps may still be staged
                staging_root.rmdir()
            rotate_checkpoints(
                output_dir=str(final_root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter_state(Path(resume_from_checkpoint))
        _load_method_state(_adapter_model(self), Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        self._load_adapter_state(Path(self.state.best_model_checkpoint))

    def _load_adapter_state(self, checkpoint: Path) -> None:
        file = checkpoint / STATE_FILE
        if not file.is_file():
            raise LoraCliError(f"{checkpoint} has no {STATE_FILE}: it was not written by loracli")
        state = load_file(file)
        if not distributed.load_sharded_adapter_state(self, state):  # FSDP / ZeRO-3: into each slice
            _adapter_model(self).load_adapter_state_dict(state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP the Trainer would also write the whole model, frozen base included, into
        every checkpoint; the adapter files are all that --resume needs besides the optimizer."""
        if not self.is_fsdp_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _run_epoch(self, *args, **kwargs):
        # Training data whose random augmentation is seeded by (seed, epoch, row) learns the
        # epoch here: accelerate's own set_epoch skips the dataset when resuming mid-epoch.
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)
