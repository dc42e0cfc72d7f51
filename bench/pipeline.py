"""``python -m bench.pipeline``: the image loader alone, images per CPU-second, loracli vs the guide.

The guide (Hugging Face's Food-101 LoRA guide): ``load_dataset("imagefolder")`` +
``set_transform`` with torchvision v1 ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize``, through a DataLoader (batch 32, shuffled, 0 workers) and its
``torch.stack`` collate. loracli: ``image_cache.decode_cache`` (raw or JPEG storage) +
``image_batches.ImageBatches`` + ``collate`` + ``normalize_pixels``, same DataLoader settings.

Cases, interleaved each round (guide, loracli cold, loracli cached, ...):

- *decoding epoch*: loracli builds its cache from scratch (a fresh cache folder) and then
  runs one epoch; the guide runs one epoch (every guide epoch decodes).
- *cached epoch*: one more epoch over the cache built before the rounds (a new epoch
  number each round, so new crops).

CPU time is the process's (``time.process_time``) plus finished child processes
(``os.times``), so worker processes count too. Figures are medians over rounds of the
per-round ratios. ``--workers-check`` also times a tiny LoRA ViT training loop fed by 0 vs
1 loader worker (wall time: what a worker could win is overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.photos import make_photo_folder

CROP = 224
MEAN = STD = [0.5, 0.5, 0.5]


def cpu_now() -> float:
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def measure(fn: Callable[[], int]) -> dict[str, float]:
    start_cpu, start_wall = cpu_now(), time.perf_counter()
    n = fn()
    cpu, wall = cpu_now() - start_cpu, time.perf_counter() - start_wall
    return {"images": n, "cpu_s": cpu, "wall_s": wall, "img_per_cpu_s": n / cpu, "img_per_s": n / wall}


# ------------------------------------------------------------------- guide
def guide_loader(root: Path, hf_cache: Path, batch: int, workers: int = 0):
    import datasets
    from torchvision import transforms as T

    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(hf_cache))
    tf = T.Compose([T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])

    def preprocess(rows):
        rows["pixel_values"] = [tf(image.convert("RGB")) for image in rows["image"]]
        return rows

    ds.set_transform(preprocess)

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples])}

    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=workers)


def run_epoch(loader, normalize: bool = False) -> int:
    from lora_cli.tasks.data.image_batches import normalize_pixels

    n = 0
    for b in loader:
        pixels = normalize_pixels(b["pixel_values"], MEAN, STD) if normalize else b["pixel_values"]
        n += pixels.shape[0]
    return n


# ----------------------------------------------------------------- loracli
def loracli_dataset(files: list[tuple[str, int]]):
    import datasets

    classes = sorted({label for _, label in files})
    features = datasets.Features({"image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=[f"class{c}" for c in classes])})
    return datasets.Dataset.from_dict({"image": [p for p, _ in files], "label": [lab for _, lab in files]},
                                      features=features)


def loracli_loader(cached, batch: int, workers: int = 0, seed: int = 0):
    from lora_cli.tasks.data.image_batches import ImageBatches, collate

    rows = ImageBatches(cached, CROP, train=True, seed=seed)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=True, collate_fn=collate,
                                         num_workers=workers, persistent_workers=workers > 0)
    return rows, loader


def build_cache(ds, cache_dir: Path, storage: str):
    from lora_cli.tasks.data.image_cache import decode_cache, train_short_side

    return decode_cache(ds, "image", size=train_short_side(CROP), storage=storage, cache_dir=cache_dir)


def summarize(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}


def loader_bench(root: Path, files, work: Path, args) -> dict:
    import datasets

    from lora_cli.tasks.data.image_cache import cache_bytes

    datasets.disable_progress_bars()
    guide = guide_loader(root, work / "hf", args.batch)
    ds = loracli_dataset(files)
    storages = args.storage.split(",")
    cached = {s: build_cache(ds, work / f"warm-{s}", s) for s in storages}
    warm = {s: loracli_loader(cached[s], args.batch) for s in storages}
    disk = {s: cache_bytes(cached[s]) / len(ds) for s in storages}

    def cold(storage: str, r: int) -> Callable[[], int]:
        def go() -> int:
            folder = work / f"cold-{storage}-{r}"
            c = build_cache(ds, folder, storage)
            n = run_epoch(loracli_loader(c, args.batch)[1], normalize=True)
            shutil.rmtree(folder, ignore_errors=True)
            return n
        return go

    def cached_epoch(storage: str, r: int) -> Callable[[], int]:
        rows, loader = warm[storage]
        rows.set_epoch(r + 1)
        return lambda: run_epoch(loader, normalize=True)

    def reuse(storage: str) -> Callable[[], int]:
        return lambda: len(build_cache(ds, work / f"warm-{storage}", storage))  # key + open, no decode

    for _ in range(args.warmup):
        run_epoch(guide)
        for s in storages:
            run_epoch(warm[s][1], normalize=True)
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        cases = {"guide": lambda: run_epoch(guide)}
        for s in storages:
            cases[f"loracli {s} decoding epoch"] = cold(s, r)
            cases[f"loracli {s} cached epoch"] = cached_epoch(s, r)
            cases[f"loracli {s} cache reuse (startup)"] = reuse(s)
        for name, fn in cases.items():
            results.setdefault(name, []).append(measure(fn))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]['img_per_cpu_s']:.0f} img/cpu-s" for k, v in results.items() if "startup" not in k), flush=True)

    out = {"disk_bytes_per_image": disk, "cases": {}, "ratios_vs_guide": {}}
    for name, runs in results.items():
        out["cases"][name] = {"img_per_cpu_s": summarize([x["img_per_cpu_s"] for x in runs]),
                              "img_per_s": summarize([x["img_per_s"] for x in runs]),
                              "cpu_s": summarize([x["cpu_s"] for x in runs])}
        if name != "guide" and "startup" not in name:
            ratios = [x["img_per_cpu_s"] / g["img_per_cpu_s"] for x, g in zip(runs, results["guide"])]
            out["ratios_vs_guide"][name] = summarize(ratios)
    return out


# ---------------------------------------------------------- workers check
def workers_bench(files, work: Path, args) -> dict:
    """Tiny LoRA ViT steps fed by 0 vs 1 loader worker: wall images/s, interleaved."""
    from transformers import ViTConfig, ViTForImageClassification

    from lora_cli.adapters import LoraConfig, get_adapter_model
    from lora_cli.tasks.data.image_batches import normalize_pixels

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=CROP, patch_size=16, num_labels=8)
    model = get_adapter_model(ViTForImageClassification(config), LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cached = build_cache(loracli_dataset(files), work / "warm-raw", "raw")
    loaders = {w: loracli_loader(cached, args.batch, workers=w) for w in (0, 1)}

    def epoch(workers: int, r: int) -> Callable[[], int]:
        rows, loader = loaders[workers]
        rows.set_epoch(r)

        def go() -> int:
            n = 0
            for b in loader:
                loss = model(pixel_values=normalize_pixels(b["pixel_values"], MEAN, STD), labels=b["labels"]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n += len(b["labels"])
            return n
        return go

    epoch(0, 0)()
    epoch(1, 0)()
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for r in range(args.rounds):
        for w in (0, 1):
            runs[w].append(measure(epoch(w, r + 1)))
        print(f"workers round {r + 1}: 0 workers {runs[0][-1]['img_per_s']:.0f} img/s, "
              f"1 worker {runs[1][-1]['img_per_s']:.0f} img/s", flush=True)
    ratios = [a["img_per_s"] / b["img_per_s"] for a, b in zip(runs[1], runs[0])]
    return {"img_per_s": {f"{w} workers": summarize([x["img_per_s"] for x in runs[w]]) for w in runs},
            "one_worker_over_none_wall": summarize(ratios)}


def report(figures: dict) -> None:
    loader = figures["loader"]
    print(f"\n{'case':38s} {'img/cpu-s':>10s} {'img/s':>8s}   vs guide, img/cpu-s (IQR)")
    for name, case in loader["cases"].items():
        ratio = loader["ratios_vs_guide"].get(name)
        text = f"{ratio['median']:.2f}x ({ratio['q1']:.2f}-{ratio['q3']:.2f})" if ratio else ""
        print(f"{name:38s} {case['img_per_cpu_s']['median']:10.0f} {case['img_per_s']['median']:8.0f}   {text}")
    for storage, size in loader["disk_bytes_per_image"].items():
        print(f"cache on disk, {storage}: {size / 1024:.1f} KiB per image")
    if "workers" in figures:
        w = figures["workers"]
        for name, v in w["img_per_s"].items():
            print(f"tiny LoRA ViT training, {name}: {v['median']:.0f} img/s (wall)")
        r = w["one_worker_over_none_wall"]
        print(f"1 worker / 0 workers, wall img/s: {r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="JPEGs in the generated folder (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (default 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--storage", default="raw,jpeg", help="loracli cache storages to time (default raw,jpeg)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--workers-check", action="store_true", help="also time 0 vs 1 worker feeding a tiny ViT")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        files = make_photo_folder(work / "photos", args.images)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"{platform.processor() or platform.machine()}; {len(files)} JPEGs in {work / 'photos'}")
        figures = {"loader": loader_bench(work / "photos", files, work, args)}
        if args.workers_check:
            figures["workers"] = workers_bench(files, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
