"""Sharded training through the Trainer, 2 CPU processes (gloo): DeepSpeed ZeRO-3 and FSDP2.

A sharded model keeps a slice of every adapter tensor on each process. These runs show that
the slices really are partial (so saving without gathering would write empty or cut
tensors), that the run directory still gets the whole adapter, equal to one process with
twice the batch, and that --resume and load_best_model_at_end write full tensors back into
the slices.

FSDP: accelerate prepares it only when a GPU is present; the worker lets its multi-CPU state
take the FSDP plugin (test-only patch, below). Everything after that (wrapping, the
Trainer's loop, loracli's gathering and loading) is the code a GPU run goes through.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_imagefolder
from tests.training._dist import PER_DEVICE, assert_close, launch, recipe_file, torchrun

pytest.importorskip("deepspeed")

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"]}
STEPS, SAVE_EVERY = 4, 2

SHARDINGS = {
    # persistence threshold 0: ZeRO-3 would otherwise keep tensors this small whole on every process
    "deepspeed-zero3": {"deepspeed": {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }},
    # no transformer_layer_cls_to_wrap: loracli's default must get ViT through FSDP2's wrapping
    "fsdp2": {"fsdp": True, "fsdp_config": {"version": 2}},
}

WORKER = '''
import json, os, sys
from pathlib import Path
from transformers import TrainerCallback
from lora_cli.training import distributed
from lora_cli.training.pipeline import run_training

if os.environ.get("TEST_CPU_FSDP"):
    import accelerate.state as state

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = state.DistributedType.FSDP, plugin

    state.AcceleratorState.__init__ = init
    distributed.accelerate_runs_fsdp = lambda: True


class Probe(TrainerCallback):
    """Per adapter tensor: [elements this process holds, elements of the whole tensor]."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)
        held = {}
        for key, tensor in model.live_adapter_tensors(model.active_adapter).items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            full = getattr(tensor, "ds_numel", None) or tensor.numel()
            held[key] = [local.numel(), full]
        out = Path(sys.argv[2]) / f"rank{os.environ.get('RANK', '0')}.json"
        out.write_text(json.dumps(held))


class Stop(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


Path(sys.argv[2]).mkdir(exist_ok=True)
callbacks = [Probe()] + ([Stop()] if os.environ.get("TEST_STOP") else [])
overrides = [a for a in sys.argv[3:] if a != "--resume"]
run_training(sys.argv[1], overrides, extra_callbacks=callbacks, resume="--resume" in sys.argv)
'''


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _recipe(folder: Path, data: Path, sharding: dict) -> Path:
    path = recipe_file(folder, data, LORA, max_steps=STEPS)
    recipe = json.loads(path.read_text())
    recipe["training"].update(save_strategy="steps", save_steps=SAVE_EVERY, **sharding)
    path.write_text(json.dumps(recipe), encoding="utf-8")
    return path


def _worker(folder: Path, recipe: Path, name: str, *overrides: str, env: dict | None = None) -> None:
    worker = folder / "worker.py"
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    launch(torchrun(2, str(worker), str(recipe), str(folder / f"probe-{name}"), *overrides), folder, env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> Path:
    """The same recipe without sharding: 1 process, twice the per-device batch."""
    folder = tmp_path_factory.mktemp("single")
    recipe = _recipe(folder, data, {})
    launch([sys.executable, "-m", "lora_cli", "train", str(recipe), f"training.per_device_train_batch_size={2 * PER_DEVICE}"],
           folder)
    return folder / "run"


@pytest.fixture(scope="module", params=sorted(SHARDINGS))
def sharded(request, tmp_path_factory, data) -> dict:
    """One sharding: a straight run, and a run stopped at its first checkpoint then resumed."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    recipe = _recipe(folder, data, SHARDINGS[name])
    env = {"TEST_CPU_FSDP": "1"} if name.startswith("fsdp") else {}
    _worker(folder, recipe, "straight", env=env)
    _worker(folder, recipe, "stopped", f"output_dir={folder / 'resumed'}", env={**env, "TEST_STOP": "1"})
    stopped = _adapter(folder / "resumed")
    _worker(folder, recipe, "resumed", f"output_dir={folder / 'resumed'}", "--resume", env=env)
    return {"name": name, "folder": folder, "recipe": recipe, "env": env, "stopped": stopped}


@pytest.mark.slow
def test_each_process_held_only_a_slice_yet_the_saved_adapter_is_whole(sharded, single):
    folder = sharded["folder"]
    for rank in (0, 1):
        held = json.loads((folder / "probe-straight" / f"rank{rank}.json").read_text())
        assert held, "the probe saw no adapter tensors"
        assert all(local < full for local, full in held.values()), f"rank {rank} held whole tensors: not sharded"
    got, expected = _adapter(folder / "run"), _adapter(single)
    assert any("lora_B" in k and v.abs().max() > 1e-3 for k, v in got.items())  # it trained
    assert_close(got, expected)  # 2 x batch 4, sharded == 1 x batch 8


@pytest.mark.slow
def test_sharded_adapter_loads_in_peft_with_equal_logits(sharded):
    from peft import PeftModel
    from transformers import ViTForImageClassification

    from lora_cli.inference.loading import load_run

    run = sharded["folder"] / "run"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = ViTForImageClassification.from_pretrained(run / "base_model").eval()
    theirs = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(load_run(run, device="cpu").model(pixel_values=x).logits,
                                   theirs(pixel_values=x).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_run_directory_is_complete(sharded):
    run = sharded["folder"] / "run"
    report = json.loads((run / "eval.json").read_text())
    assert report["num_samples"] == 12 and len(report["confusion_matrix"]) == 3  # every process evaluated, rank 0 wrote
    assert (run / "plots" / "confusion_matrix.png").is_file()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"checkpoint-{SAVE_EVERY}", f"checkpoint-{STEPS}"]
    for checkpoint in checkpoints:
        saved = load_file(run / "checkpoints" / checkpoint / "adapter_model.safetensors")
        reference = _adapter(run)
        assert all(saved[k].shape == reference[k].shape for k in reference)  # whole, not a slice
    if sharded["name"].startswith("fsdp"):  # the frozen base is not copied into every checkpoint
        assert not list(run.rglob("pytorch_model_fsdp*")) and not list(run.rglob("*.distcp"))


@pytest.mark.slow
def test_sharded_resume_ends_where_the_uninterrupted_run_ends(sharded):
    folder = sharded["folder"]
    expected, stopped, resumed = _adapter(folder / "run"), sharded["stopped"], _adapter(folder / "resumed")
    assert max((stopped[k] - expected[k]).abs().max().item() for k in expected) > 1e-4  # the stop came early
    assert_close(resumed, expected, atol=1e-6)


@pytest.mark.slow
def test_load_best_model_at_end_loads_the_best_checkpoint_into_the_slices(sharded):
    folder, name = sharded["folder"], "best"
    # greater_is_better on the loss: the best checkpoint is an early one, not the last
    _worker(folder, sharded["recipe"], name, f"output_dir={folder / name}", "training.max_steps=3",
            "training.save_steps=1", "training.eval_strategy=steps", "training.eval_steps=1",
            "training.load_best_model_at_end=true", "training.metric_for_best_model=eval_loss",
            "training.greater_is_better=true", env=sharded["env"])
    run = folder / name
    state = json.loads((run / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    assert best != "checkpoint-3"
    final, best_saved = _adapter(run), load_file(run / "checkpoints" / best / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
    assert max((last[k] - best_saved[k]).abs().max().item() for k in last) > 1e-4
    assert_close(final, best_saved, atol=0)
