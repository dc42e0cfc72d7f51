"""Runs whose init rewrote base weights reload exactly: in a fresh process, on a base loaded
from a folder as a hub model would be, eval / predict / merge and PEFT give the logits of
the trained in-memory model, and --resume rebuilds the start without running the init.

The delivered adapter is converted to the original base (rank 2r, init_lora_weights true)
and LoftQ's rewritten weights travel as base_rewrites.safetensors (see
lora_cli.adapters.methods.lora.base_rewrites).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback, ViTForImageClassification

from lora_cli.adapters import LoraConfig, get_adapter_model
from lora_cli.adapters import functional as fn
from lora_cli.adapters.base_weights import BASE_REWRITES_NAME
from lora_cli.adapters.methods.lora import base_rewrites
from lora_cli.training.pipeline import run_training
from tests.helpers import TINY_VIT, tiny_opt
from tests.training._util import recipe_dict

ROOT = Path(__file__).resolve().parents[2]
INITS = {
    "pissa_niter_2": {},
    "loftq": {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
    "lora_ga": {"calibration_batches": 2},  # the train calibration pass calls initialize_lora_ga_weights
}

RELOAD = r"""
import sys, torch, peft
from lora_cli.adapters.base_weights import apply_base_weights
from lora_cli.inference.loading import load_run
from lora_cli.inference.predict import load_merged
from lora_cli.inference.runs import load_predictor, merge_from_run

run, pixels, out = sys.argv[1], torch.load(sys.argv[2], weights_only=True), sys.argv[3]
results = {}
with torch.no_grad():
    loaded = load_run(run, device="cpu")                                   # eval
    results["eval"] = loaded.model(pixel_values=pixels).logits
    model, _, _ = load_predictor(run_dir=run, device="cpu")                # predict
    results["predict"] = model(pixel_values=pixels).logits
    merge_from_run(run, out + "/merged", device="cpu")                     # merge (verified)
    results["merge"] = load_merged(out + "/merged", device="cpu")[0](pixel_values=pixels).logits
    labels = [loaded.id2label[i] for i in sorted(loaded.id2label)]
    base = loaded.task.build_model(loaded.recipe.model, labels)            # PEFT on the untouched base
    apply_base_weights(base, run + "/adapter")                             # LoftQ: its dequantized weights
    results["peft"] = peft.PeftModel.from_pretrained(base, run + "/adapter").eval()(pixel_values=pixels).logits
torch.save(results, out + "/logits.pt")
"""


class KeepLogits(TrainerCallback):
    def __init__(self, pixels):
        self.pixels, self.logits = pixels, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(pixel_values=self.pixels).logits.detach().clone()


class StopAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


@pytest.fixture
def vit_folder(tmp_path):
    """A tiny ViT saved as a hub model would be: config, weights and image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "hub-vit"
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_VIT.items() if k != "model_type"}
    ViTModel(ViTConfig(**cfg), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _recipe(tmp_path, images, folder, init, name="run", **training):
    recipe = recipe_dict(
        images, tmp_path / name,
        adapter={"init_lora_weights": init, "r": 4, "lora_alpha": 8, **INITS[init]},
        training={"max_steps": 4, **training},
    )
    recipe["model"] = {"name_or_path": str(folder)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("init", list(INITS))
def test_fresh_process_reload_gives_the_trained_logits(tmp_path, imagefolder, vit_folder, init):
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    keep = KeepLogits(pixels)
    run = run_training(_recipe(tmp_path, imagefolder, vit_folder, init), extra_callbacks=[keep])

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["r"] == (4 if init == "loftq" else 8)  # PiSSA, LoRA-GA: [B, -B0][A; A0]
    assert (run / "adapter" / BASE_REWRITES_NAME).is_file() == (init == "loftq")
    # the start, for --resume, is written once: LoRA-GA's in its calibration record, the others' in init_state
    assert (run / "init_state.safetensors").is_file() == (init != "lora_ga")
    assert (run / "calibration.safetensors").is_file() == (init == "lora_ga")

    torch.save(pixels, tmp_path / "pixels.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(run), str(tmp_path / "pixels.pt"), str(tmp_path)],
                   check=True, cwd=ROOT, timeout=300)
    results = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert sorted(results) == ["eval", "merge", "peft", "predict"]
    for verb, logits in results.items():
        torch.testing.assert_close(logits, keep.logits, atol=2e-5, rtol=1e-5, msg=verb)
    with torch.no_grad():  # a sanity check that the logits compared carry the run
        base_logits = ViTForImageClassification.from_pretrained(vit_folder, num_labels=3)(pixel_values=pixels).logits
    assert (base_logits - keep.logits).abs().max() > 1e-3


@pytest.mark.slow
def test_resume_restores_the_start_without_running_the_init(tmp_path, imagefolder, vit_folder, monkeypatch):
    training = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    straight = run_training(_recipe(tmp_path, imagefolder, vit_folder, "pissa_niter_2", "a", **training))
    recipe = _recipe(tmp_path, imagefolder, vit_folder, "pissa_niter_2", "b", **training)
    stopped = run_training(recipe, extra_callbacks=[StopAfterCheckpoint()])
    checkpoint = load_file(next((stopped / "checkpoints").iterdir()) / "adapter_model.safetensors")
    assert all(t.shape[0] == 4 or t.shape[-1] == 4 for k, t in checkpoint.items() if "lora_" in k)  # unconverted

    def no_init(*args, **kwargs):
        raise AssertionError("--resume ran the PiSSA init again")

    monkeypatch.setattr(fn, "pissa_factors", no_init)
    resumed = run_training(recipe, resume=True)
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_initial_state_round_trip_is_bit_exact():
    """restore_initial_state on an untouched base gives the init's base weights bit for bit."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    torch.manual_seed(3)
    started = get_adapter_model(tiny_opt(), LoraConfig(**kw, init_lora_weights="pissa_niter_2"))
    state = base_rewrites.initial_state(started)
    assert len(state) == 2 * len(started.targets["default"])
    fresh = get_adapter_model(tiny_opt(), LoraConfig(**kw))
    base_rewrites.restore_initial_state(fresh, state)
    ours, theirs = dict(started.named_parameters()), dict(fresh.named_parameters())
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    fresh.peft_config["default"] = started.peft_config["default"]  # as train --resume does
    assert base_rewrites.initial_state(fresh).keys() == state.keys()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_conversion_keeps_every_delta(tmp_path, use_rslora):
    """Rank patterns, alpha patterns and rsLoRA: the converted adapter on the original base
    gives the logits of the PiSSA model; a layer without a rewrite is padded with zeros."""
    import peft

    inputs = {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": use_rslora,
          "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}, "init_lora_weights": "pissa_niter_1"}
    model = get_adapter_model(tiny_opt(), LoraConfig(**kw)).eval()
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for _, p in layer.adapter_tensors("default"):
                p.add_(0.05 * torch.randn_like(p))
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path, convert_to_original_base=True)
    state = load_file(tmp_path / "adapter_model.safetensors")
    emb = "base_model.model.model.decoder.embed_tokens.lora_embedding_A"
    assert state[emb].shape[0] == 8 and torch.count_nonzero(state[emb][4:]) == 0
    theirs = peft.PeftModel.from_pretrained(tiny_opt(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_dora_with_pissa_saves_the_rewritten_weights(tmp_path):
    """DoRA's magnitude is relative to W' = W - s B0 A0, so no rank-2r LoRA can stand in for
    it: the rewritten weights travel as base_rewrites.safetensors instead."""
    import peft

    inputs = {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "init_lora_weights": "pissa"}
    model = get_adapter_model(tiny_opt(), LoraConfig(**kw)).eval()
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for _, p in layer.adapter_tensors("default"):
                p.add_(0.05 * torch.randn_like(p))
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path, convert_to_original_base=True)
    rewrites = load_file(tmp_path / BASE_REWRITES_NAME)
    assert len(rewrites) == len(model.targets["default"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["init_lora_weights"] is True
    from lora_cli.adapters import AdapterModel

    with torch.no_grad():
        torch.testing.assert_close(AdapterModel.from_pretrained(tiny_opt(), tmp_path)(**inputs).logits, expected,
                                   atol=1e-5, rtol=0)
        base = tiny_opt()
        base.load_state_dict(rewrites, strict=False)
        torch.testing.assert_close(peft.PeftModel.from_pretrained(base, tmp_path).eval()(**inputs).logits, expected,
                                   atol=1e-5, rtol=0)
