"""`loracli train --dry-run` shows what would train and writes nothing; fp16 on a machine
without CUDA trains in float32 after one warning naming the key."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.training.pipeline import run_training
from tests.training._util import loracli, write_recipe

ADAPTED = [f"vit.layers.{i}.attention.{name}" for i in range(2) for name in ("q_proj", "v_proj")]


def test_dry_run_prints_modules_and_parameters_and_writes_nothing(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run")
    before = sorted(tmp_path.rglob("*"))
    assert loracli(monkeypatch, "train", recipe, "--dry-run") == 0
    err = capsys.readouterr().err
    for path in ADAPTED:
        assert path in err, err
    # r=4 on 4 (32 x 32) matrices: 4 * (4*32 + 32*4) = 1024; the head 32*3 + 3 = 99 trains in full
    assert "trainable params: 1,123 || all params:" in err, err
    assert "classifier" in err and "24 train rows / 12 eval rows" in err
    assert sorted(tmp_path.rglob("*")) == before
    assert not (tmp_path / "run").exists()


def test_dry_run_skips_the_existing_run_dir_check(tmp_path, imagefolder, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier work")
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run")
    assert loracli(monkeypatch, "train", recipe, "--dry-run") == 0
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp16_without_cuda_trains_in_float32_with_one_warning(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run",
                          training={"fp16": True, "max_steps": 2, "save_strategy": "steps", "save_steps": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_training(recipe)
    about_fp16 = [str(w.message) for w in caught if "fp16" in str(w.message)]
    assert len(about_fp16) == 1, about_fp16
    assert "training.fp16" in about_fp16[0] and "float32" in about_fp16[0]
    args = torch.load(run / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert not args.fp16 and not args.bf16
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert (run / "eval.json").is_file()
