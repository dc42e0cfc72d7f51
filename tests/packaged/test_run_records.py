"""A run trained on a ``pypi:`` model: recipe.yaml keeps the ``pypi:`` name (resolving again hits the
cache), adapter_config.json names the cached folder, and PEFT loads the adapter on that folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lora_cli.inference.loading import load_run
from lora_cli.packaged import cache
from tests.packaged.conftest import FAKE
from tests.training._util import loracli, recipe_dict


@pytest.mark.slow
def test_a_run_on_a_packaged_model_reloads_here_and_in_peft(fake, cache_dir, tmp_path, monkeypatch, imagefolder):
    import peft
    from transformers import AutoModelForImageClassification

    run = tmp_path / "run"
    recipe = recipe_dict(imagefolder, run, training={"learning_rate": 5e-2})
    recipe["model"] = {"name_or_path": f"pypi:{FAKE}"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert loracli(monkeypatch, "train", str(path)) == 0

    folder = cache.cache_root() / "packaged" / f"{FAKE}-1.0"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["name_or_path"] == f"pypi:{FAKE}"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(folder)
    assert not (run / "base_model").exists()  # the cache holds the base; the run need not copy it

    loaded = load_run(run)
    ds = loaded.task.eval_dataset(loaded.recipe.data, loaded.recipe.seed, loaded.processor, limit=6)
    batch = loaded.task.make_collator(loaded.processor, loaded.recipe.data)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        ours = loaded.model(pixel_values=batch["pixel_values"]).logits
        with loaded.model.disable_adapter():
            base = loaded.model(pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(ours, base, atol=1e-4), "the trained adapter changes nothing"

    labels = loaded.id2label
    theirs_base = AutoModelForImageClassification.from_pretrained(
        adapter_config["base_model_name_or_path"], num_labels=len(labels), id2label=labels,
        label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    theirs = peft.PeftModel.from_pretrained(theirs_base, run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=batch["pixel_values"]).logits, ours, atol=1e-5, rtol=1e-4)

    assert loracli(monkeypatch, "eval", str(run)) == 0
    assert fake.calls == 1  # train, load_run and eval all found the cached folder
