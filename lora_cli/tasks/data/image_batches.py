"""Batches from the decode cache: uint8 crops and flips keyed by (seed, epoch, row).

    cached uint8 HWC rows --__getitems__(indices)--> crop box + flip per row
        --> resize_hwc (torch's uint8 bilinear antialias kernel, torchvision v2's bytes) --> collate: uint8 (B, 3, H, W)
        --> normalize_pixels on the model's device: (x / 255 - mean) / std in one step

Training rows get torchvision's ``RandomResizedCrop`` (scale (0.08, 1), ratio (3/4, 4/3),
the same rejection sampling with 10 attempts and the same centre-crop fallback) and a
horizontal flip with p = 0.5. Every random number a row uses is a pure function of
``(seed, epoch, row)`` (:func:`uniforms`, a counter-based SplitMix64 stream): nothing is
drawn from a global generator, so a row's crop does not depend on which batch it lands in,
on the worker that makes it or on prefetching, and a run resumed mid-epoch sees exactly the
crops of the run that never stopped. Eval rows are served as cached (the cache already
resized and centre-cropped them).

Pixels stay uint8 until the model's device: a uint8 batch is a quarter of float32's bytes
through the loader's queues, pinned memory and PCIe. Batches are ``torch.channels_last``
(the cache's HWC rows, never transposed), which the convolution of a patch embedding
prefers on GPUs; :func:`normalize_pixels` keeps that layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lora_cli.tasks.data import image_cache

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
"""torchvision's RandomResizedCrop tries 10 boxes before falling back to a centre crop."""
DRAWS = 4 * ATTEMPTS + 1  # area, log-aspect, top, left per attempt; one for the flip

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------- random draws
def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, rows: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``(len(rows), n)`` floats in [0, 1): draw ``j`` of ``row`` depends only on (seed, epoch, row, j)."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([(seed & _MASK) ^ 0x5851F42D4C957F2D], dtype=np.uint64))
        base = _mix(base ^ np.uint64(epoch & _MASK) * _GOLDEN)
        keys = _mix(base ^ _mix(np.asarray(rows, dtype=np.int64).astype(np.uint64) + _GOLDEN))
        counters = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN
        words = _mix(keys[:, None] + counters[None, :])
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_boxes(draws: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float] = SCALE,
               ratio: tuple[float, float] = RATIO) -> np.ndarray:
    """``(n, 4)`` int boxes (top, left, height, width): ``RandomResizedCrop.get_params``, vectorised.

    ``draws`` is ``(n, >= 4 * ATTEMPTS)`` uniforms from :func:`uniforms`. For each row:
    up to 10 attempts of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first
    box that fits is placed uniformly; if none fits, the whole image cropped to the
    nearest allowed aspect, centred.
    """
    heights = np.asarray(heights, dtype=np.int64)[:, None]
    widths = np.asarray(widths, dtype=np.int64)[:, None]
    k = ATTEMPTS
    area = (heights * widths) * (scale[0] + (scale[1] - scale[0]) * draws[:, 0:k])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * draws[:, k:2 * k])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint: round half to even, like round()
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = fits.argmax(axis=1)
    rows = np.arange(len(draws))
    bh, bw = h[rows, first], w[rows, first]
    top = np.floor(draws[rows, 2 * k + first] * (heights[:, 0] - bh + 1)).astype(np.int64)
    left = np.floor(draws[rows, 3 * k + first] * (widths[:, 0] - bw + 1)).astype(np.int64)
    boxes = np.stack([top, left, bh, bw], axis=1)
    for i in np.flatnonzero(~fits.any(axis=1)):
        boxes[i] = _fallback(int(heights[i, 0]), int(widths[i, 0]), ratio)
    return boxes


def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's centre crop when no attempt fits."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# -------------------------------------------------------------------- dataset
class ImageBatches(torch.utils.data.Dataset):
    """Rows of a :func:`image_cache.decode_cache` dataset as ``{"pixel_values", "labels"}``.

    ``pixel_values`` is uint8 ``(3, *crop)`` in ``channels_last`` layout. ``train=True``
    applies RandomResizedCrop + flip from (seed, epoch, row); ``train=False`` serves the
    cached rows, which must already be ``crop`` sized. ``label_column=None`` leaves the
    labels out (predict). The DataLoader fetches whole batches through
    :meth:`__getitems__`. The epoch lives in shared memory, so :meth:`set_epoch` reaches
    persistent worker processes too.
    """

    def __init__(self, cached, crop: int | tuple[int, int], *, train: bool, seed: int = 0,
                 label_column: str | None = "label", scale: tuple[float, float] = SCALE,
                 ratio: tuple[float, float] = RATIO, flip: bool = True) -> None:
        self.storage = image_cache.storage_of(cached)
        self.crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        self.train, self.seed, self.flip = train, int(seed), flip
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.label_column = label_column
        columns = [c for c in image_cache.PIXEL_COLUMNS if c in cached.column_names]
        self._pixels = cached.select_columns(columns).with_format("arrow")
        self._labels = np.asarray(cached[label_column], dtype=np.int64) if label_column else None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self._pixels)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate) before each epoch."""
        self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        rows = np.asarray([int(i) for i in indices], dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        arrays = image_cache.rows_as_arrays(self._pixels[rows.tolist()], self.storage)
        pixels = self._augment(rows, arrays) if self.train else [self._as_is(a) for a in arrays]
        if self._labels is None:
            return [{"pixel_values": p} for p in pixels]
        return [{"pixel_values": p, "labels": int(self._labels[r])} for p, r in zip(pixels, rows)]

    def _augment(self, rows: np.ndarray, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        draws = uniforms(self.seed, self.epoch, rows, DRAWS)
        heights = np.array([a.shape[0] for a in arrays])
        widths = np.array([a.shape[1] for a in arrays])
        boxes = crop_boxes(draws, heights, widths, self.scale, self.ratio)
        flips = (draws[:, -1] < 0.5) & self.flip
        out = []
        for array, (top, left, h, w), flipped in zip(arrays, boxes, flips):
            resized = resize_hwc(array[top:top + h, left:left + w].copy(), self.crop)  # copies the box only
            out.append(resized.flip(-1) if flipped else resized)  # torch's flip (numpy's ::-1 copy is slower)
        return out

    def _as_is(self, array: np.ndarray) -> torch.Tensor:
        if array.shape[:2] != self.crop:
            raise ValueError(
                f"eval rows are cached at {array.shape[0]}x{array.shape[1]}, not the crop {self.crop[0]}x{self.crop[1]}: "
                "build the eval cache with decode_cache(..., center_crop=crop)")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def resize_hwc(pixels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A C-contiguous uint8 ``(h, w, 3)`` array -> uint8 ``(3, *size)`` channels-last tensor.

    Bilinear with antialias on torch's native uint8 kernel: the same bytes as torchvision v2
    ``F.resize(t, size, antialias=True)`` of the ``(3, h, w)`` view, without v2's per-call
    dispatch (it costs about as much as a small resize). Like v2, the fake batch dimension
    gets a stride that keeps the input unambiguously channels-last, so ``interpolate``
    allocates its output channels-last too (pytorch/pytorch#68430) instead of re-packing it.
    """
    h, w, c = pixels.shape
    image = torch.from_numpy(pixels)
    if (h, w) == tuple(size):
        return image.permute(2, 0, 1)
    image = image.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    out = torch.nn.functional.interpolate(image, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0]


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``{"pixel_values": uint8 (B, 3, H, W) channels_last, "labels": int64 (B,)}`` (labels if present)."""
    first = rows[0]["pixel_values"]
    c, h, w = first.shape
    pixels = torch.empty((len(rows), h, w, c), dtype=first.dtype).permute(0, 3, 1, 2)  # uint8 from ImageBatches
    for slot, row in zip(pixels, rows):
        slot.copy_(row["pixel_values"])
    return _with_labels({"pixel_values": pixels}, rows)


def _with_labels(batch: dict[str, torch.Tensor], rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([int(row["labels"]) for row in rows], dtype=torch.int64)
    return batch


def collate_normalized(rows: Sequence[dict[str, Any]], mean: Sequence[float], std: Sequence[float]
                       ) -> dict[str, torch.Tensor]:
    """:func:`collate` then :func:`normalize_pixels` (float32, CPU), fused: each row is cast
    and normalised straight into its slot of the batch while it is in cache, instead of a
    uint8 batch written and then read again three times. The same values, bit for bit, and
    the same channels_last layout. Rows that are not uint8 take the two-step path."""
    first = rows[0]["pixel_values"]
    if first.dtype != torch.uint8 or first.dim() != 3 or any(r["pixel_values"].shape != first.shape for r in rows):
        batch = collate(rows)
        batch["pixel_values"] = normalize_pixels(batch["pixel_values"], mean, std)
        return batch
    c, h, w = first.shape
    k, scale_k, shift_k = _tiled_affine(h * w, *_affine(mean, std, torch.device("cpu")))
    pixels = torch.empty((len(rows), h, w, c), dtype=torch.float32)
    for slot, row in zip(pixels, rows):
        flat = slot.view(-1, k * c)
        flat.copy_(row["pixel_values"].permute(1, 2, 0).reshape(-1, k * c))  # a view when the row is channels_last
        flat.mul_(scale_k).add_(shift_k)
    return _with_labels({"pixel_values": pixels.permute(0, 3, 1, 2)}, rows)


# ---------------------------------------------------------------- normalising
_AFFINE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_pixels(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` or ``(3, H, W)`` -> ``(x / 255 - mean) / std`` as ``dtype``.

    Call it where the batch is used, after it reached the model's device (the Trainer's
    ``_prepare_inputs``, eval and predict included): uint8 travels, floats do not. One
    multiply-add per element: on CUDA a single fused kernel (uint8 read, float written);
    on the CPU a cast then in-place multiply and add over the pixels' own memory order,
    which is several times faster there than a per-channel broadcast over channels_last.
    Keeps the memory layout. Computed in float32, then cast: bf16/fp16 results carry one
    rounding only. A floating input is returned unchanged (already normalised).
    """
    if pixel_values.is_floating_point():
        return pixel_values
    scale, shift = _affine(mean, std, pixel_values.device)
    if pixel_values.device.type != "cpu":
        view = (1, -1, 1, 1) if pixel_values.dim() == 4 else (-1, 1, 1)
        out = torch.addcmul(shift.view(view), pixel_values, scale.view(view))
    else:
        out = _normalize_cpu(pixel_values, scale, shift)
    return out if dtype == torch.float32 else out.to(dtype)


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) as float32 vectors on ``device``, made once per device."""
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), device)
    if key not in _AFFINE:
        scale = torch.tensor([1.0 / (255.0 * s) for s in key[1]], dtype=torch.float32)
        shift = torch.tensor([-m / s for m, s in zip(key[0], key[1])], dtype=torch.float32)
        _AFFINE[key] = (scale.to(device), shift.to(device))
    return _AFFINE[key]


def _tiled_affine(pixels: int, scale: torch.Tensor, shift: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """k whole pixels per row (k divides ``pixels``, at most 64) and the per-channel scale and
    shift tiled k times: channels-last pixels viewed as (N, k * c) rows normalise as plain rows."""
    k = math.gcd(pixels, 64)
    return k, scale.repeat(k), shift.repeat(k)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x.to(torch.float32)`` of a contiguous CPU tensor, as ``empty`` + ``copy_``.

    Same values; measured 1.3 against 9 ms for a 32x224x224x3 uint8 batch on this project's
    machine (torch 2.14.1, glibc malloc): ``Tensor.to`` there pays fresh-page faults on
    every batch that ``empty`` + ``copy_`` does not (bench/README.md).
    """
    return torch.empty(x.shape, dtype=torch.float32).copy_(x)


def _normalize_cpu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    hwc = x.permute(0, 2, 3, 1) if channels_last else x.permute(1, 2, 0) if x.dim() == 3 else None
    if hwc is None or not hwc.is_contiguous():  # planar (NCHW) memory: per-plane scalars vectorise well
        view = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
        return _as_float32(x).mul_(scale.view(view)).add_(shift.view(view))
    c = hwc.shape[-1]
    k, scale_k, shift_k = _tiled_affine(hwc.numel() // c, scale, shift)
    flat = _as_float32(hwc.reshape(-1, k * c)).mul_(scale_k).add_(shift_k)
    out = flat.view(hwc.shape)
    return out.permute(0, 3, 1, 2) if channels_last else out.permute(2, 0, 1)


# ------------------------------------------------------------ loader settings
MIN_CPUS_FOR_WORKERS = 3
"""Below this many cores per process, loader workers run in the main process (0 workers):
measured on 2 cores, one worker process took the model's second core and lost time
(bench/README.md)."""
MAX_WORKERS = 16


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_defaults(cpu_count: int | None = None, cuda: bool = False, *, processes: int = 1) -> dict[str, Any]:
    """``TrainingArguments`` DataLoader kwargs for this machine (a recipe's own values win).

    Workers: the cores per training process minus one for the process itself, at most
    :data:`MAX_WORKERS`, and none below :data:`MIN_CPUS_FOR_WORKERS` cores. Persistent
    workers and a prefetch of 4 batches per worker when there are workers; pinned memory
    on CUDA only (it makes the host-to-device copy asynchronous; on CPU it only costs).
    """
    cpus = max(1, (cpu_count or available_cpus()) // max(1, processes))
    workers = 0 if cpus < MIN_CPUS_FOR_WORKERS else min(cpus - 1, MAX_WORKERS)
    out: dict[str, Any] = {
        "dataloader_num_workers": workers,
        "dataloader_persistent_workers": workers > 0,
        "dataloader_pin_memory": bool(cuda),
    }
    if workers:
        out["dataloader_prefetch_factor"] = 4
    return out
