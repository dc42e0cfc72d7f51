"""Tiny LoRA / LoHa runs written as `loracli train` writes them, for the verbs that make new runs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from lora_cli import rundir as rd
from lora_cli.adapters import get_adapter_model, get_method
from tests.helpers import CLASSES, TINY_VIT, tiny_vit
from tests.inference.conftest import METHOD_FIELDS


def make_run(root: Path, name: str, images: Path, method: str = "lora", seed: int = 1, base_seed: int = 0,
             classes=CLASSES) -> Path:
    """A complete image-classification run on a tiny ViT: non-zero adapter on query/value, trained head."""
    from transformers import ViTImageProcessor

    run = root / name
    id2label = dict(enumerate(classes))
    base = tiny_vit(num_labels=len(classes), seed=base_seed)
    base.config.id2label, base.config.label2id = id2label, {v: k for k, v in id2label.items()}
    base.save_pretrained(run / rd.BASE_MODEL_DIR)
    fields = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], **METHOD_FIELDS[method]}
    model = get_adapter_model(base, get_method(method).config_cls(**fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(run / rd.ADAPTER_DIR)
    rd.save_label_map(run / rd.ADAPTER_DIR, id2label)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(run / rd.PROCESSOR_DIR)
    recipe = {
        "name": name, "task": "image-classification", "seed": 0, "output_dir": str(run),
        "model": {"config": dict(TINY_VIT), "processor": {"size": {"height": 32, "width": 32}}},
        "data": {"imagefolder": str(images)},
        "adapter": {"method": method, **fields},
        "training": {"per_device_eval_batch_size": 6},
    }
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    rd.write_json(run / rd.ENV_FILE, {"seed": 0})
    rd.write_status(run, "completed")
    return run


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to prove a command left it untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_adapter(run: Path, edit) -> Path:
    """Rewrite ``run``'s adapter file with ``edit(key, tensor) -> tensor`` applied to every tensor
    (a damaged or extreme adapter, as a diverged training or a hostile file leaves it)."""
    from safetensors.torch import load_file, save_file

    file = run / rd.ADAPTER_DIR / "adapter_model.safetensors"
    save_file({key: edit(key, tensor).contiguous() for key, tensor in load_file(file).items()}, file,
              metadata={"format": "pt"})
    return run
