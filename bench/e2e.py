"""End to end and input-bound: `loracli train` against the Food-101 guide's own script.

Both train the same tiny random ViT at 224 px, LoRA r=16 on the query/value projections,
for ``--epochs`` over a generated folder of real-photo 512 px JPEGs (``bench.photos``),
batch 32, each in its own process, interleaved (guide, loracli, guide, loracli, ...).

The ViT (hidden 64, 2 layers, patch 32: 50 tokens) is chosen so that the model costs
little and the image pipeline dominates, as the benchmark means to measure: the bench
times the model's own training step on a fixed batch and prints it as a share of the
guide's step. With ``--patch-size 16`` (197 tokens) the model alone takes about as long as
the guide's pipeline on 2 cores, and the run is no longer input-bound.

Reported per side, as medians over the rounds:

- ``train img/s``: the Trainer's own ``train_samples_per_second`` (the training loop), and
  the median and range of the per-round ratios;
- ``process cpu s``: user + system CPU time of the whole process (children included),
  from ``resource.getrusage(RUSAGE_CHILDREN)`` around each subprocess.

loracli's first round builds its decode cache (outside the training loop, inside the
process); later rounds reuse it, as a second run of the same recipe does. The guide
decodes every image every epoch, as its script does.

    .venv/bin/python -m bench.e2e --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

from bench.photos import make_photo_folder

VIT = {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 128, "image_size": 224, "patch_size": 32}

GUIDE = textwrap.dedent('''
    import json, sys
    import datasets, torch
    from torchvision import transforms as T
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification
    from peft import LoraConfig, get_peft_model

    root, out, epochs, vit = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
    ds = datasets.load_dataset("imagefolder", data_dir=root, split="train")
    labels = ds.features["label"].names
    vit.pop("model_type")
    model = ViTForImageClassification(ViTConfig(num_labels=len(labels), **vit))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.1, modules_to_save=["classifier"]))
    norm = T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    def transform(batch):
        batch["pixel_values"] = [train_tf(img.convert("RGB")) for img in batch["image"]]
        del batch["image"]
        return batch
    ds.set_transform(transform)
    def collate(rows):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
                "labels": torch.tensor([r["label"] for r in rows])}
    args = TrainingArguments(out, per_device_train_batch_size=32, num_train_epochs=epochs, learning_rate=5e-3,
                             remove_unused_columns=False, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=False)
    result = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate).train()
    print("RESULT", json.dumps(result.metrics))
''')


def write_recipe(path: Path, root: Path, out: Path, epochs: float, vit: dict, workers: int | None) -> None:
    recipe = {
        "name": "e2e", "task": "image-classification", "output_dir": str(out),
        "model": {"config": vit},
        "data": {"imagefolder": str(root), "val_split": 0.05},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 16, "lora_dropout": 0.1,
                    "target_modules": ["q_proj", "v_proj"]},
        "training": {"per_device_train_batch_size": 32, "num_train_epochs": epochs, "learning_rate": 5e-3,
                     "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1000},
    }
    if workers is not None:
        recipe["training"]["dataloader_num_workers"] = workers
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def model_step_ms(vit: dict, batch: int = 32, steps: int = 12) -> float:
    """Median wall ms of one training step of the guide's model (PEFT LoRA, AdamW) on a fixed batch."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    config = {k: v for k, v in vit.items() if k != "model_type"}
    model = get_peft_model(ViTForImageClassification(ViTConfig(num_labels=8, **config)),
                           LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                      modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(batch, 3, vit["image_size"], vit["image_size"]), torch.randint(0, 8, (batch,))
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--patch-size", type=int, default=VIT["patch_size"])
    parser.add_argument("--workers", type=int, default=None, help="loracli's dataloader_num_workers (default: its own)")
    args = parser.parse_args(argv)
    vit = {**VIT, "patch_size": args.patch_size}

    work = Path(tempfile.mkdtemp(prefix="loracli-e2e-"))
    try:
        _run(args, vit, work)
    finally:  # the photos, caches and runs: a few hundred MB
        shutil.rmtree(work, ignore_errors=True)


def _run(args, vit: dict, work: Path) -> None:
    root = work / "photos" / "train"
    make_photo_folder(root, args.images)
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    guide_script = work / "guide.py"
    guide_script.write_text(GUIDE)
    recipe = work / "recipe.yaml"
    figures: dict[str, dict[str, list[float]]] = {"guide": {"ips": [], "cpu": []}, "loracli": {"ips": [], "cpu": []}}
    for i in range(args.rounds):
        cpu, text = timed([sys.executable, str(guide_script), str(root), str(work / f"guide{i}"), str(args.epochs),
                           json.dumps(vit)], env)
        metrics = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
        figures["guide"]["ips"].append(metrics["train_samples_per_second"])
        figures["guide"]["cpu"].append(cpu)
        write_recipe(recipe, root.parent, work / f"run{i}", args.epochs, vit, args.workers)
        cpu, _ = timed([sys.executable, "-m", "lora_cli", "train", str(recipe)], env)
        logged = [json.loads(line) for line in (work / f"run{i}" / "metrics.jsonl").read_text().splitlines() if line]
        ips = next((r["train_samples_per_second"] for r in reversed(logged) if "train_samples_per_second" in r), None)
        figures["loracli"]["ips"].append(float(ips) if ips else float("nan"))
        figures["loracli"]["cpu"].append(cpu)
        print(f"round {i}: guide {figures['guide']['ips'][-1]:.1f} img/s, {figures['guide']['cpu'][-1]:.1f} cpu s; "
              f"loracli {figures['loracli']['ips'][-1]:.1f} img/s, {cpu:.1f} cpu s", flush=True)
    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in figures.items()}
    ratios = [b / a for a, b in zip(figures["guide"]["ips"], figures["loracli"]["ips"])]
    model_ms = model_step_ms(vit)
    guide_step_ms = 1000 * 32 / med["guide"]["ips"]
    print(f"\nmedian over {args.rounds} rounds, {args.images} images, {args.epochs} epoch(s), {os.cpu_count()} CPUs, "
          f"patch {args.patch_size}")
    print(f"  train img/s: guide {med['guide']['ips']:.1f}, loracli {med['loracli']['ips']:.1f} "
          f"-> loracli / guide {med['loracli']['ips'] / med['guide']['ips']:.2f}x; per-round ratios: median "
          f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"  the model's own training step (fixed batch of 32, no loader): {model_ms:.1f} ms = "
          f"{100 * model_ms / guide_step_ms:.0f}% of the guide's {guide_step_ms:.1f} ms step")
    print(f"  process cpu s: guide {med['guide']['cpu']:.1f}, loracli {med['loracli']['cpu']:.1f} "
          f"-> loracli / guide {med['loracli']['cpu'] / med['guide']['cpu']:.2f}x")
    first = figures["loracli"]["cpu"][0]
    print(f"  loracli round 0 (builds the decode cache): {first:.1f} cpu s")
    if args.json:
        args.json.write_text(json.dumps({"rounds": figures, "median": med, "ratios": ratios, "model_step_ms": model_ms},
                                        indent=2))


if __name__ == "__main__":
    main()
