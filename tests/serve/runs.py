"""Tiny runs for the serve tests, written as `loracli train` writes them, in seconds.

Image runs come from ``tests.inference.runs_fixture.make_run`` (tiny ViT, non-zero adapter,
trained head). Text runs are built here the same way: the base comes from the recipe's own
``model.config`` through the task's ``build_model`` (what ``train`` does), seeded, and is
saved in ``base_model/``; the adapter gets non-zero weights, so every run answers differently.
Runs with the same ``base_seed`` have byte-identical bases and share one model in the server.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from lora_cli import rundir as rd
from lora_cli.adapters import LoHaConfig, LoraConfig, get_adapter_model
from lora_cli.recipe import load_recipe
from lora_cli.tasks import get_task
from tests.helpers import make_imagefolder
from tests.helpers_text import (
    TINY_CONFIGS,
    make_tokenizer,
    prompt_rows,
    sentiment_rows,
    write_csv,
    write_jsonl,
)
from tests.inference.runs_fixture import make_run

LM_CONFIG = {**TINY_CONFIGS["gpt2"], "n_positions": 256}
"""Room for long generations (the disconnect test needs a stream that outlasts its client)."""


def image_runs(root: Path) -> dict[str, Path]:
    """img-a / img-b: LoRA on one base (mixed batches); img-c: LoRA on another base; img-loha /
    img-loha2: LoHa on img-a's base weights, one model for both (LoHa cannot mix: a batch per run)."""
    images = make_imagefolder(root / "images")
    return {
        "img-a": make_run(root, "img-a", images, seed=1, base_seed=0),
        "img-b": make_run(root, "img-b", images, seed=2, base_seed=0),
        "img-c": make_run(root, "img-c", images, seed=3, base_seed=1),
        "img-loha": make_run(root, "img-loha", images, method="loha", seed=4, base_seed=0),
        "img-loha2": make_run(root, "img-loha2", images, method="loha", seed=9, base_seed=0),
    }


def text_run(root: Path, name: str, task: str, seed: int, base_seed: int = 0, method: str = "lora") -> Path:
    """A seq-cls (tiny BERT, labels neg / pos) or causal-lm (tiny GPT-2) run on word-level tokens."""
    run = root / name
    run.mkdir(parents=True)
    bert = task == "seq-cls"
    tokenizer = make_tokenizer(root / f"tok-{task}", template="bert" if bert else "plain")
    if bert:
        data = {"train_file": str(write_csv(run / "train.csv", sentiment_rows(24))), "val_split": 0.25, "max_length": 16}
        targets, head = ["query", "value"], ["classifier"]
    else:
        data = {"train_file": str(write_jsonl(run / "train.jsonl", prompt_rows())), "max_length": 32}
        targets, head = ["c_attn"], None
    options = {"r": 4, "lora_alpha": 8} if method == "lora" else {"r": 4, "alpha": 8}
    recipe = {
        "name": name, "task": task, "seed": 0, "output_dir": str(run),
        "model": {"config": TINY_CONFIGS["bert"] if bert else LM_CONFIG, "tokenizer": str(tokenizer)},
        "data": data,
        "adapter": {"method": method, **options, "target_modules": targets, **({"modules_to_save": head} if head else {})},
        "training": {"max_steps": 1, "use_cpu": True},
    }
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    loaded = load_recipe(run / rd.RECIPE_FILE)
    task_mod = get_task(task)
    labels = ["neg", "pos"] if bert else None
    torch.manual_seed(base_seed)
    base = task_mod.build_model(loaded.model, labels)
    base.save_pretrained(run / rd.BASE_MODEL_DIR)
    task_mod.load_processor(loaded.model).save_pretrained(run / rd.PROCESSOR_DIR)
    config_cls = LoraConfig if method == "lora" else LoHaConfig
    model = get_adapter_model(base, config_cls(target_modules=targets, modules_to_save=head, **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(run / rd.ADAPTER_DIR)
    if labels:
        rd.save_label_map(run / rd.ADAPTER_DIR, dict(enumerate(labels)))
    rd.write_json(run / rd.ENV_FILE, {"seed": 0})
    rd.write_status(run, "completed")
    return run


def all_runs(root: Path) -> dict[str, Path]:
    """Every kind the server serves: four image runs, two text classifiers and two LMs (pairs on one base)."""
    runs = image_runs(root)
    runs["cls-a"] = text_run(root, "cls-a", "seq-cls", seed=5)
    runs["cls-b"] = text_run(root, "cls-b", "seq-cls", seed=6)
    runs["lm-a"] = text_run(root, "lm-a", "causal-lm", seed=7)
    runs["lm-b"] = text_run(root, "lm-b", "causal-lm", seed=8)
    return runs


def png_bytes(seed: int, size: int = 40) -> bytes:
    """A small random RGB PNG (different sizes and contents exercise the eval resize)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + seed % 7, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A few kilobytes of PNG that decode to 400 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()
