"""The throughput image pipeline: decode cache, seeded uint8 augmentation, collate, normalise.

Images are crops of scikit-learn's two sample photographs (real JPEG statistics), saved as
~512 px JPEGs in tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from lora_cli.tasks.data import image_batches as ib
from lora_cli.tasks.data import image_cache as ic
from lora_cli.tasks.data.images import ImageLoadError, load_image
from tests.helpers import guide_transforms

FEATURES = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=["a", "b"])})


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def samples() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg, flower.jpg: 427x640 RGB


def photo(samples, k: int, long_side: int = 512) -> Image.Image:
    """A different real-photo crop for each k, resized to ``long_side``."""
    rng = np.random.default_rng(k)
    src = samples[k % 2]
    h = int(rng.integers(300, src.shape[0]))
    w = min(src.shape[1], int(h * rng.uniform(0.8, 1.4)))
    top, left = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
    img = Image.fromarray(src[top:top + h, left:left + w])
    s = long_side / max(h, w)
    return img.resize((round(w * s), round(h * s)), Image.BICUBIC)


def folder(tmp_path: Path, samples, n: int = 6) -> list[str]:
    root = tmp_path / "photos"
    paths = []
    for k in range(n):
        path = root / ("a" if k % 2 else "b") / f"{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(samples, k).save(path, quality=90)
        paths.append(str(path))
    return paths


def dataset(paths: list[str]):
    return datasets.Dataset.from_dict({"image": paths, "label": [k % 2 for k in range(len(paths))]}, features=FEATURES)


def counting_decoder(monkeypatch) -> list[int]:
    calls = []
    real = ic.decode_one

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ic, "decode_one", counted)
    return calls


# ---------------------------------------------------- crop-box distribution
KS_ALPHA_CRITICAL = 1.949  # two-sample Kolmogorov-Smirnov, alpha = 0.001: D > 1.949 * sqrt(2 / n) rejects


def _statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(float)
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h),
            "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


def _distribution_gaps(ours: np.ndarray, reference: np.ndarray, height: int, width: int) -> dict[str, float]:
    """KS statistic / critical value per box statistic: > 1 means "not the same distribution"."""
    a, b = _statistics(ours, height, width), _statistics(reference, height, width)
    crit = KS_ALPHA_CRITICAL * np.sqrt((len(ours) + len(reference)) / (len(ours) * len(reference)))
    return {name: ks_2samp(a[name], b[name]).statistic / crit for name in a}


def _torchvision_boxes(n: int, height: int, width: int) -> np.ndarray:
    from torchvision.transforms import v2

    torch.manual_seed(1234)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    return np.array([v2.RandomResizedCrop.get_params(image, list(ib.SCALE), list(ib.RATIO)) for _ in range(n)])


@pytest.mark.parametrize("height,width", [(256, 341), (400, 256)])
def test_crop_boxes_have_torchvision_distribution(height, width):
    n = 20_000
    reference = _torchvision_boxes(n, height, width)
    heights, widths = np.full(n, height), np.full(n, width)
    ours = ib.crop_boxes(ib.uniforms(7, 0, np.arange(n), ib.DRAWS), heights, widths)
    gaps = _distribution_gaps(ours, reference, height, width)
    assert max(gaps.values()) < 1.0, gaps
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    flips = ib.uniforms(7, 0, np.arange(n), ib.DRAWS)[:, -1] < 0.5
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)


@pytest.mark.parametrize("scale,ratio,pinned_top", [
    ((0.1, 1.0), ib.RATIO, False), ((0.08, 0.8), ib.RATIO, False), ((0.08, 1.0), (0.8, 1.25), False),
    (ib.SCALE, ib.RATIO, True),
])
def test_the_distribution_check_rejects_other_parameters(scale, ratio, pinned_top):
    """The checker above is not vacuous: a slightly different scale or ratio range, or boxes
    always at the top edge, fail it (measured KS/critical: 1.5-7.6; the right sampler: 0.35-0.46)."""
    n, height, width = 20_000, 256, 341
    reference = _torchvision_boxes(n, height, width)
    wrong = ib.crop_boxes(ib.uniforms(7, 0, np.arange(n), ib.DRAWS), np.full(n, height), np.full(n, width),
                          scale=scale, ratio=ratio)
    if pinned_top:
        wrong[:, 0] = 0
    assert max(_distribution_gaps(wrong, reference, height, width).values()) > 1.0


def test_fallback_is_torchvision_centre_crop():
    """A 40:1 strip leaves no attempt room: every box is the centred 4:3 crop torchvision falls back to."""
    n = 50
    boxes = ib.crop_boxes(ib.uniforms(0, 0, np.arange(n), ib.DRAWS), np.full(n, 10), np.full(n, 400))
    assert {tuple(int(v) for v in b) for b in boxes} == {(0, (400 - 13) // 2, 10, 13)}
    from torchvision.transforms import v2

    assert tuple(v2.RandomResizedCrop.get_params(torch.zeros(3, 10, 400), list(ib.SCALE), list(ib.RATIO))) == (
        0, (400 - 13) // 2, 10, 13)


# ------------------------------------------------------------- determinism
def test_draws_depend_only_on_seed_epoch_row():
    alone = ib.uniforms(3, 1, [17], ib.DRAWS)
    batch = ib.uniforms(3, 1, [5, 17, 900], ib.DRAWS)
    np.testing.assert_array_equal(alone[0], batch[1])
    assert not np.array_equal(ib.uniforms(3, 2, [17], ib.DRAWS), alone)
    assert not np.array_equal(ib.uniforms(4, 1, [17], ib.DRAWS), alone)


def test_same_row_same_crop_whatever_the_batch(tmp_path, samples):
    cached = ic.decode_cache(dataset(folder(tmp_path, samples)), "image", size=256, cache_dir=tmp_path / "cache")
    rows = ib.ImageBatches(cached, 224, train=True, seed=11)
    first = rows.__getitems__([0, 1, 2, 3])
    again = rows.__getitems__([3, 5, 0])
    assert torch.equal(first[0]["pixel_values"], again[2]["pixel_values"])
    assert torch.equal(first[3]["pixel_values"], again[0]["pixel_values"])
    assert torch.equal(rows[2]["pixel_values"], first[2]["pixel_values"])
    assert [r["labels"] for r in first] == [0, 1, 0, 1]
    rows.set_epoch(1)
    later = rows.__getitems__([0, 1, 2, 3])
    assert all(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, later))
    other_seed = ib.ImageBatches(cached, 224, train=True, seed=12).__getitems__([0, 1, 2, 3])
    assert all(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, other_seed))


def test_set_epoch_reaches_persistent_workers(tmp_path, samples):
    cached = ic.decode_cache(dataset(folder(tmp_path, samples, n=4)), "image", size=64, cache_dir=tmp_path / "c")
    rows = ib.ImageBatches(cached, 56, train=True, seed=0)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=ib.collate, num_workers=workers,
                                             persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            rows.set_epoch(epoch)
            out.append(torch.cat([b["pixel_values"] for b in loader]))
        return out

    in_process, in_worker = epochs(0), epochs(1)
    assert not torch.equal(in_process[0], in_process[1])
    assert torch.equal(in_process[0], in_worker[0]) and torch.equal(in_process[1], in_worker[1])


# ----------------------------------------------------- eval == the slow path
PROCESSORS = {
    "vit (squash to 224)": (SimpleNamespace(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
                            (224, 224), (224, 224)),
    "short side + centre crop": (SimpleNamespace(size={"shortest_edge": 256}, do_center_crop=True,
                                                 crop_size={"height": 224, "width": 224},
                                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
                                 256, (224, 224)),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_eval_inputs_equal_the_slow_path(tmp_path, samples, name):
    """Measured: at most one grey level apart (torch's uint8 resize vs PIL's), under 1% of pixels."""
    processor, resize, crop = PROCESSORS[name]
    paths = folder(tmp_path, samples, n=4)
    slow_tf = guide_transforms(processor, train=False)
    slow = torch.stack([slow_tf(load_image(p)) for p in paths])
    cached = ic.decode_cache(dataset(paths), "image", size=resize, center_crop=crop, draft=False,
                             cache_dir=tmp_path / "c")
    rows = ib.ImageBatches(cached, crop, train=False)
    fast = ib.normalize_pixels(ib.collate(rows.__getitems__(range(len(paths))))["pixel_values"],
                               processor.image_mean, processor.image_std)
    assert fast.shape == slow.shape and fast.dtype == slow.dtype
    grey = 1 / 255 / torch.tensor(processor.image_std).view(1, 3, 1, 1)
    levels = ((fast - slow).abs() / grey).round()
    assert levels.max() <= 1
    assert (levels > 0).float().mean() < 0.01


def test_draft_decoding_of_a_large_jpeg_matches_full_decoding(tmp_path, samples):
    """A 2048 px JPEG decoded at 1/4 scale, then resized: within ~1 grey level on average."""
    path = tmp_path / "big.jpg"
    photo(samples, 3, long_side=2048).save(path, quality=92)
    with Image.open(path) as img:
        full_size = img.size
    assert max(ic.load_pixels(path, 256)[0].shape) < max(full_size) / 3  # draft mode was used
    drafted = ic.decode_one(path, 256, draft=True).astype(int)
    full = ic.decode_one(path, 256, draft=False).astype(int)
    assert drafted.shape == full.shape
    assert min(drafted.shape[:2]) == 256
    diff = np.abs(drafted - full)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 12


def test_draft_keeps_exif_orientation(tmp_path, samples):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo(samples, 1, long_side=1600).save(path, quality=92, exif=exif)
    upright = load_image(path).size
    drafted = ic.decode_one(path, (200, 150), draft=True)
    assert drafted.shape == (200, 150, 3)
    assert ic.decode_one(path, 256, draft=True).shape[:2] == ic.decode_one(path, 256, draft=False).shape[:2]
    drafted_full, full_size = ic.load_pixels(path, 256)
    assert full_size == (upright[1], upright[0]) and drafted_full.shape[1] < upright[1] / 2
    assert drafted_full.shape[2] / drafted_full.shape[1] == pytest.approx(upright[0] / upright[1], rel=0.01)
    small = tmp_path / "rotated_small.jpg"
    photo(samples, 1, long_side=300).save(small, quality=92, exif=exif)  # no draft: torchvision's decoder
    fast, _ = ic.load_pixels(small)
    np.testing.assert_array_equal(fast.permute(1, 2, 0).numpy(), np.asarray(load_image(small)))


# --------------------------------------------------------------- the cache
def test_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path, samples, monkeypatch):
    paths = folder(tmp_path, samples)
    calls = counting_decoder(monkeypatch)
    first = ic.decode_cache(dataset(paths), "image", size=128, cache_dir=tmp_path / "c")
    assert len(calls) == len(paths)
    cache_file = first.cache_files[0]["filename"]
    written = os.stat(cache_file).st_mtime_ns

    second = ic.decode_cache(dataset(paths), "image", size=128, cache_dir=tmp_path / "c")
    assert len(calls) == len(paths)  # nothing decoded again
    assert second.cache_files[0]["filename"] == cache_file and os.stat(cache_file).st_mtime_ns == written
    assert second[:][ic.RAW_COLUMN] == first[:][ic.RAW_COLUMN]

    photo(samples, 40).save(paths[2], quality=90)  # new content (and mtime)
    edited = ic.decode_cache(dataset(paths), "image", size=128, cache_dir=tmp_path / "c")
    assert len(calls) == 2 * len(paths)
    assert edited.cache_files[0]["filename"] != cache_file
    assert edited[2][ic.RAW_COLUMN] != first[2][ic.RAW_COLUMN] and edited[0][ic.RAW_COLUMN] == first[0][ic.RAW_COLUMN]

    stat = os.stat(paths[4])
    os.utime(paths[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched only: rebuilt anyway
    ic.decode_cache(dataset(paths), "image", size=128, cache_dir=tmp_path / "c")
    assert len(calls) == 3 * len(paths)

    ic.decode_cache(dataset(paths), "image", size=160, cache_dir=tmp_path / "c")  # other geometry: other cache
    assert len(calls) == 4 * len(paths)


def test_embedded_bytes_are_keyed_on_content_and_labels_are_never_cached(tmp_path, samples, monkeypatch):
    paths = folder(tmp_path, samples, n=3)
    blobs = [Path(p).read_bytes() for p in paths]

    def embedded(images: list[bytes], labels: list[int]):
        rows = [{"bytes": b, "path": None} for b in images]
        return datasets.Dataset.from_dict({"image": rows, "label": labels}, features=FEATURES)

    calls = counting_decoder(monkeypatch)
    ic.decode_cache(embedded(blobs, [0, 1, 0]), "image", size=64, cache_dir=tmp_path / "c")
    relabelled = ic.decode_cache(embedded(blobs, [1, 1, 1]), "image", size=64, cache_dir=tmp_path / "c")
    assert len(calls) == 3 and relabelled["label"] == [1, 1, 1]
    ic.decode_cache(embedded([blobs[1], blobs[0], blobs[2]], [0, 1, 0]), "image", size=64, cache_dir=tmp_path / "c")
    assert len(calls) == 6


def test_jpeg_storage_is_smaller_and_close_to_raw(tmp_path, samples):
    ds = dataset(folder(tmp_path, samples, n=4))
    raw = ic.decode_cache(ds, "image", size=256, center_crop=(224, 224), cache_dir=tmp_path / "c")
    jpeg = ic.decode_cache(ds, "image", size=256, center_crop=(224, 224), storage="jpeg", cache_dir=tmp_path / "c")
    assert ic.storage_of(raw) == "raw" and ic.storage_of(jpeg) == "jpeg"
    assert ic.cache_bytes(jpeg) < ic.cache_bytes(raw) / 4
    a = torch.stack([r["pixel_values"] for r in ib.ImageBatches(raw, 224, train=False).__getitems__(range(4))])
    b = torch.stack([r["pixel_values"] for r in ib.ImageBatches(jpeg, 224, train=False).__getitems__(range(4))])
    assert (a.int() - b.int()).abs().float().mean() < 3.0  # quality 90 re-encoding


def test_several_processes_build_the_same_cache(tmp_path, samples):
    ds = dataset(folder(tmp_path, samples, n=4))
    one = ic.decode_cache(ds, "image", size=64, cache_dir=tmp_path / "one")
    two = ic.decode_cache(ds, "image", size=64, cache_dir=tmp_path / "two", num_proc=2)
    assert one[:][ic.RAW_COLUMN] == two[:][ic.RAW_COLUMN] and one["label"] == two["label"]


def test_eval_rows_of_the_wrong_size_are_refused(tmp_path, samples):
    cached = ic.decode_cache(dataset(folder(tmp_path, samples, n=2)), "image", size=256, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="center_crop"):
        ib.ImageBatches(cached, 224, train=False)[0]


# ------------------------------------------------- collate, normalise, loader
@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_resize_hwc_matches_torchvision_v2_resize(size):
    """The direct uint8 antialiased resize of a crop: the bytes and the channels-last layout of
    torchvision v2 ``F.resize(..., antialias=True)``, then its horizontal flip (torch's flip)."""
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(20, 300, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        box = pixels[top:, left:].copy()
        want = F.resize(torch.from_numpy(box.copy()).permute(2, 0, 1), list(size), antialias=True)
        got = ib.resize_hwc(box, size)
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got.flip(-1), F.horizontal_flip(want))
    same = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    assert torch.equal(ib.resize_hwc(same, size), torch.from_numpy(same).permute(2, 0, 1))


def test_collate_and_normalize():
    rows = [{"pixel_values": torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8), "labels": k} for k in range(3)]
    batch = ib.collate(rows)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (3, 3, 8, 6)
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1, 2]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = ib.normalize_pixels(batch["pixel_values"], mean, std)
    expected = (batch["pixel_values"].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    half = ib.normalize_pixels(batch["pixel_values"], mean, std, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=2e-2, rtol=1e-2)
    assert ib.normalize_pixels(expected, mean, std) is expected
    one = ib.normalize_pixels(rows[0]["pixel_values"], mean, std)
    torch.testing.assert_close(one, expected[0], atol=1e-5, rtol=0)


def test_collate_normalized_equals_collate_then_normalize_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    planar = [torch.randint(0, 256, (3, 10, 7), dtype=torch.uint8, generator=g) for _ in range(3)]
    hwc = [torch.randint(0, 256, (10, 7, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1) for _ in range(2)]
    rows = [{"pixel_values": p, "labels": k} for k, p in enumerate(planar + hwc)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    fused = ib.collate_normalized(rows, mean, std)
    two_step = ib.normalize_pixels(ib.collate(rows)["pixel_values"], mean, std)
    assert fused["pixel_values"].dtype == torch.float32 and torch.equal(fused["pixel_values"], two_step)
    assert fused["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert fused["labels"].tolist() == [0, 1, 2, 3, 4]
    unlabelled = ib.collate_normalized([{"pixel_values": p} for p in planar], mean, std)
    assert set(unlabelled) == {"pixel_values"} and torch.equal(unlabelled["pixel_values"], two_step[:3])
    floats = [{"pixel_values": two_step[k].contiguous(), "labels": k} for k in range(2)]
    assert torch.equal(ib.collate_normalized(floats, mean, std)["pixel_values"], two_step[:2])


def test_loader_defaults():
    assert ib.loader_defaults(2, cuda=False) == {"dataloader_num_workers": 0, "dataloader_persistent_workers": False,
                                                  "dataloader_pin_memory": False}
    gpu = ib.loader_defaults(16, cuda=True)
    assert gpu["dataloader_num_workers"] == 15 and gpu["dataloader_pin_memory"] and gpu["dataloader_persistent_workers"]
    assert ib.loader_defaults(64, cuda=True)["dataloader_num_workers"] == ib.MAX_WORKERS
    assert ib.loader_defaults(16, cuda=True, processes=4)["dataloader_num_workers"] == 3
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(Path("unused")), **ib.loader_defaults(8, cuda=False))
    assert args.dataloader_num_workers == 7 and args.dataloader_prefetch_factor == 4


def test_the_loader_keeps_load_image_semantics(tmp_path, samples):
    """Other formats and modes go through the shared loader; a truncated JPEG is a named error."""
    rgb = np.asarray(photo(samples, 2, long_side=64))
    png = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 100, np.uint8)]), "RGBA").save(png)
    pixels, _ = ic.load_pixels(png, draft_size=16)
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(load_image(png)))
    grey = tmp_path / "grey.jpg"
    photo(samples, 2, long_side=64).convert("L").save(grey, quality=90)
    np.testing.assert_array_equal(ic.load_pixels(grey)[0].permute(1, 2, 0).numpy(), np.asarray(load_image(grey)))
    whole = tmp_path / "whole.jpg"
    photo(samples, 5).save(whole, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated"):
        ic.decode_one(cut, 256, draft=False)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_in_smoke_mode(tmp_path):
    """bench/gpu.py at toy sizes on the CPU: every part runs and reports (figures meaningless)."""
    from bench.gpu import main

    figures = main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "gpu.json").is_file()
    assert figures["step"]["autocast"]["loracli"]["img_per_s"] > 0 and figures["step"]["bf16-base"]["peft"]["mfu"] > 0
    assert set(figures["loader"]["workers"]) == {"0", "1"}
    assert all(0 <= v["stall_fraction"] <= 1 for v in figures["loader"]["workers"].values())
    assert figures["normalize_max_diff_vs_cpu"] == 0.0
