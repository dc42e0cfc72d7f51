"""Training on several processes (CPU, gloo): torchrun and accelerate launch, DDP equal to
one process with the same global batch, AdaLoRA's budget equal on every rank, FSDP gathering.

The multi-process runs are subprocesses (a launcher starts the processes); each test says
what a 2-process run must equal.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.adapters import LoHaConfig, LoraConfig
from lora_cli.training import distributed
from tests.helpers import make_imagefolder
from tests.training._dist import (
    BIN,
    PER_DEVICE,
    assert_close,
    free_port,
    launch,
    losses,
    recipe_file,
    torchrun,
)

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
ADALORA = {
    "method": "adalora", "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "lora_alpha": 8,
    "lora_dropout": 0.0, "target_modules": ["query", "value"],
}

# Runs the pipeline and dumps, per rank, what that rank holds when training ends.
WORKER = '''
import json, os, sys
from pathlib import Path
from safetensors.torch import save_file
from transformers import TrainerCallback
from lora_cli.training.pipeline import run_training

class Dump(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)
        out = Path(sys.argv[2]) / f"rank{os.environ.get('RANK', '0')}"
        save_file(model.get_adapter_state_dict(), str(out) + ".safetensors")
        model.save_pretrained(out)
        (Path(str(out) + ".json")).write_text(json.dumps(model.method_state[model.active_adapter].rank_pattern))

run_training(sys.argv[1], sys.argv[3:], extra_callbacks=[Dump()])
'''

# FSDP1 and FSDP2 on CPU/gloo, outside the Trainer (accelerate runs FSDP only on GPUs).
FSDP_SCRIPT = '''
import sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from lora_cli.adapters import get_adapter_model, get_method
from lora_cli.training.distributed import full_adapter_state
from tests.helpers import tiny_vit

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
for kind in ("fsdp1", "fsdp2"):
    config = get_method("lora").config_cls(
        target_modules=["query", "value"], modules_to_save=["classifier"], r=4, lora_alpha=8, init_lora_weights=False)
    model = get_adapter_model(tiny_vit(seed=0), config)
    if rank == 0:
        save_file(model.get_adapter_state_dict(), f"{out}/{kind}-reference.safetensors")
    if kind == "fsdp1":
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        for layer in model.base_model.vit.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    wrapped(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
    if rank == 0:
        save_file({k: v.clone() for k, v in model.get_adapter_state_dict().items()
                   if not hasattr(v, "full_tensor")}, f"{out}/{kind}-shard.safetensors")
    full = full_adapter_state(wrapped, model)
    if rank == 0:
        model.save_pretrained(f"{out}/{kind}", state_dict=full)
    dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, data):
    """The same LoRA recipe: 2 processes x batch 4 under torchrun, and 1 process x batch 8."""
    folder = tmp_path_factory.mktemp("lora")
    recipe = recipe_file(folder, data, LORA, max_steps=3)
    launch(torchrun(2, "-m", "lora_cli", "train", str(recipe)), folder)
    launch([sys.executable, "-m", "lora_cli", "train", str(recipe), f"output_dir={folder / 'single'}",
          f"training.per_device_train_batch_size={2 * PER_DEVICE}"], folder)
    return folder / "run", folder / "single"


# ------------------------------------------------------------- fast checks
def test_defaults_for_a_cpu_multi_processrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = distributed.distributed_defaults({"learning_rate": 1e-3}, LoraConfig())
    assert out == {"learning_rate": 1e-3, "use_cpu": True, "ddp_backend": "gloo", "ddp_find_unused_parameters": False}
    # LoHa/LoKr module_dropout skips whole adapters at random: DDP must look for unused parameters
    assert distributed.distributed_defaults({}, LoHaConfig(module_dropout=0.1))["ddp_find_unused_parameters"]
    # the recipe's own choice wins
    assert distributed.distributed_defaults({"ddp_find_unused_parameters": True}, LoraConfig())["ddp_find_unused_parameters"]


def test_single_process_is_left_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.distributed_defaults({"learning_rate": 1e-3}, LoraConfig()) == {"learning_rate": 1e-3}


def test_fsdp_without_cuda_warns_and_falls_back_to_ddp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "accelerate_runs_fsdp", lambda: False)
    with pytest.warns(UserWarning, match="FSDP only on GPUs"):
        out = distributed.distributed_defaults({"fsdp": True, "fsdp_config": {"version": 2}}, LoraConfig())
    assert "fsdp" not in out and "fsdp_config" not in out  # really DDP: accelerate would refuse FSDP here
    assert out["ddp_find_unused_parameters"] is False
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no FSDP either, and no DDP settings
    with pytest.warns(UserWarning, match="FSDP only on GPUs"):
        assert distributed.distributed_defaults({"fsdp": True}, LoraConfig()) == {}


def test_fsdp_wrapping_leaves_out_the_class_that_holds_the_input_embeddings():
    from tests.helpers import tiny_gpt2, tiny_vit

    vit = tiny_vit()
    assert vit.vit.embeddings.patch_embeddings is vit.get_input_embeddings()
    out = distributed.fsdp_wrap_defaults({"fsdp": True, "fsdp_config": {"version": 2}}, vit)
    assert out["fsdp_config"] == {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"]}
    # the recipe's own choice, a config file, no FSDP, and models without the problem are left alone
    own = {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["ViTEmbeddings", "ViTLayer"]}}
    assert distributed.fsdp_wrap_defaults(own, vit) == own
    assert distributed.fsdp_wrap_defaults({"fsdp": True, "fsdp_config": "fsdp.json"}, vit)["fsdp_config"] == "fsdp.json"
    assert distributed.fsdp_wrap_defaults({"learning_rate": 1.0}, vit) == {"learning_rate": 1.0}
    assert distributed.fsdp_wrap_defaults({"fsdp": True}, tiny_gpt2()) == {"fsdp": True}


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_torchrun_writes_one_complete_run_directory(lora_runs):
    run, _ = lora_runs
    assert sorted(p.name for p in run.parent.iterdir() if p.is_dir() and (p / "recipe.yaml").exists()) == ["run", "single"]
    for name in ("recipe.yaml", "env.json", "eval.json", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/label_map.json", "processor", "base_model",
                 "plots/loss.png"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]  # written by rank 0 only: no step twice
    # 3 steps of 2 processes x 4 images = the 24 training images once: the processes split the data
    assert rows[-1]["epoch"] == pytest.approx(1.0)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_two_processes_train_like_one_with_twice_the_batch(lora_runs):
    run, single = lora_runs
    two = load_file(run / "adapter" / "adapter_model.safetensors")
    one = load_file(single / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 1e-3 for k, v in two.items())  # it trained
    assert_close(two, one)
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)  # DDP's mean equals the 1-process mean


@pytest.mark.slow
def test_adapter_from_torchrun_loads_in_peft_with_equal_logits(lora_runs):
    from peft import PeftModel
    from transformers import ViTForImageClassification

    from lora_cli.inference.loading import load_run

    run, _ = lora_runs
    ours = load_run(run, device="cpu").model
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = ViTForImageClassification.from_pretrained(run / "base_model").eval()
    with torch.no_grad():
        plain = base(pixel_values=x).logits
    theirs = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        expected, got = theirs(pixel_values=x).logits, ours(pixel_values=x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter and head changed the output


@pytest.mark.slow
def test_adalora_budget_is_the_same_on_every_rank_and_equals_one_process(tmp_path, data):
    """2 processes under `accelerate launch`, 1 process with twice the batch (and 1 with 2
    accumulation steps): the same masks on both ranks, the same adapter as one process, and
    the saved adapter is what each rank holds."""
    recipe = recipe_file(tmp_path, data, ADALORA, max_steps=6)
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER), encoding="utf-8")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    launch([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
          str(worker), str(recipe), str(tmp_path / "two")], tmp_path)
    launch([sys.executable, str(worker), str(recipe), str(tmp_path / "one"), f"output_dir={tmp_path / 'single'}",
          f"training.per_device_train_batch_size={2 * PER_DEVICE}"], tmp_path)

    patterns = [json.loads((tmp_path / d / f"rank{r}.json").read_text()) for d, r in (("two", 0), ("two", 1), ("one", 0))]
    assert patterns[0] == patterns[1] == patterns[2]
    assert any(not keep for mask in patterns[0].values() for keep in mask)  # the budget pruned ranks
    rank0, rank1 = (load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1))
    assert_close(rank0, rank1, atol=0)
    assert_close(rank0, load_file(tmp_path / "one" / "rank0.safetensors"))
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)

    # 1 process x batch 4 x 2 accumulation steps: the penalty still counts once per optimizer step
    (tmp_path / "accumulated").mkdir()
    launch([sys.executable, str(worker), str(recipe), str(tmp_path / "accumulated"), f"output_dir={tmp_path / 'acc'}",
          "training.gradient_accumulation_steps=2"], tmp_path)
    assert_close(rank0, load_file(tmp_path / "accumulated" / "rank0.safetensors"))

    saved = tmp_path / "run" / "adapter"
    for r in (0, 1):
        held = tmp_path / "two" / f"rank{r}"
        assert_close(load_file(saved / "adapter_model.safetensors"), load_file(held / "adapter_model.safetensors"), atol=0)
        config = json.loads((saved / "adapter_config.json").read_text())
        assert config["rank_pattern"] == json.loads((held / "adapter_config.json").read_text())["rank_pattern"]


@pytest.mark.slow
def test_fsdp_shards_are_gathered_before_saving(tmp_path):
    """FSDP1 and FSDP2 on CPU/gloo: the saved adapter is whole, not the process's shard."""
    script = tmp_path / "fsdp.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT), encoding="utf-8")
    launch(torchrun(2, str(script), str(tmp_path)), tmp_path)
    for kind in ("fsdp1", "fsdp2"):
        reference = load_file(tmp_path / f"{kind}-reference.safetensors")
        saved = load_file(tmp_path / kind / "adapter_model.safetensors")
        assert_close(saved, reference, atol=0)  # no optimizer step: the weights are the initial ones
        if kind == "fsdp1":  # what saving without gathering would have written
            shard = load_file(tmp_path / f"{kind}-shard.safetensors")
            assert any(shard[k].shape != reference[k].shape for k in reference)


def test_ddp_unused_parameter_failure_names_the_recipe_key():
    from lora_cli.errors import LoraCliError

    ddp_message = "Expected to have finished reduction in the prior iteration before starting a new one."
    with pytest.raises(LoraCliError, match="training.ddp_find_unused_parameters: true"):
        distributed.raise_explained(RuntimeError(ddp_message))
    distributed.raise_explained(RuntimeError("something else"))  # other errors are left alone
