"""``python -m bench.gpu`` (via ``bench/gpu.sh``): the headline job's figures on one GPU, in minutes.

1. **bf16 GEMM peak**: ``torch.matmul`` of two large bf16 matrices, best of a few timed
   loops: the ceiling that MFU is measured against, on this machine, in this run.
2. **Training step, loracli vs PEFT**: a random ViT-B/16 (``ViTConfig()``, 101 labels,
   SDPA attention) with LoRA r=16 on q/v (dropout 0.1, classifier trained), batch 128 of
   synthetic uint8 images normalised on the GPU (``normalize_pixels``, channels_last),
   AdamW (fused on CUDA), under bf16 autocast. Two precisions: ``autocast`` (fp32
   weights, what ``TrainingArguments(bf16=True)`` does) and ``bf16-base`` (the frozen base
   stored in bf16). Rounds interleave loracli and PEFT; images/s is the median over rounds.
   MFU = images/s x FLOPs per image / measured GEMM peak, with FLOPs counted for what
   the step computes: forward, input gradients of every frozen layer (no weight
   gradients), attention backward, LoRA and classifier weight gradients (ViT-B/16: ~72
   GFLOP per image).
3. **Loader stall**: a generated folder of real-photo 512 px JPEGs is decoded once
   (``decode_cache``, one process per core), then the loracli step is fed by
   ``ImageBatches`` through a DataLoader with N workers (``loader_defaults`` settings:
   persistent, prefetch 4, pinned memory). Stall fraction = time blocked in
   ``next(loader)`` / wall time, with a synchronise after every step so that the GPU's
   idle time is what is measured.

4. **QLoRA vs bf16 LoRA** (issue 15): a random Llama built from a config (GPU: hidden 2048,
   8 layers, ~0.5 B parameters), saved once and loaded three ways: bf16 weights, 4-bit NF4
   with double quantization (compute bf16) and 8-bit LLM.int8, each through transformers'
   ``BitsAndBytesConfig`` as ``model.quantization`` loads it, with loracli's LoRA r=16 on
   every attention and MLP linear. One causal-LM training step (batch x sequence tokens,
   bf16 autocast, AdamW on the adapter), rounds interleaved across the three; tokens/s is the
   median over rounds. Memory: the weights each load adds on the GPU, and the peak a step
   adds above what was allocated before it. The first step's loss is reported for each, to
   show the quantized bases train the same model.

``--smoke`` runs every part on the CPU at toy sizes in seconds (for tests, not figures);
bitsandbytes' CPU backend runs the QLoRA part there.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.photos import make_photo_folder

MEAN = STD = [0.5, 0.5, 0.5]
TARGETS = ["q_proj", "v_proj"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------- GEMM peak
def gemm_peak(device: torch.device, n: int, iters: int, trials: int = 3) -> float:
    """Best TFLOP/s of ``iters`` bf16 ``n x n @ n x n`` matmuls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    return best


# ------------------------------------------------------------ model, step
def vit_config(smoke: bool):
    from transformers import ViTConfig

    if smoke:
        return ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         image_size=32, patch_size=8, num_labels=101, attn_implementation="sdpa")
    return ViTConfig(num_labels=101, attn_implementation="sdpa")  # ViT-B/16 at 224 px


def step_flops(config, r: int = 16, adapted_per_layer: int = 2) -> float:
    """FLOPs of one LoRA training step per image (see the module docstring)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    linear = layers * tokens * 2 * (4 * d * d + 2 * d * config.intermediate_size)  # qkv, out, mlp
    attention = layers * 4 * tokens * tokens * d
    embed = 2 * patches * d * 3 * config.patch_size**2
    lora = layers * adapted_per_layer * tokens * 2 * (2 * d * r)
    head = 2 * d * config.num_labels
    forward = linear + attention + embed + lora + head
    backward = linear + 2 * attention + 2 * lora + 2 * head  # no input grad for the embedding
    return float(forward + backward)


def build_cases(config, device: torch.device, precision: str) -> dict:
    import peft
    from transformers import ViTForImageClassification

    from lora_cli.adapters import LoraConfig, get_adapter_model

    torch.manual_seed(0)
    base = ViTForImageClassification(config)
    if precision == "bf16-base":
        base = base.to(torch.bfloat16)
    fields = dict(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS, modules_to_save=["classifier"])
    models = {"loracli": get_adapter_model(copy.deepcopy(base), LoraConfig(**fields)),
              "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))}
    cases = {}
    for name, model in models.items():
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if device.type == "cuda" else {}
        cases[name] = {"model": model, "opt": torch.optim.AdamW(params, lr=1e-4, **fused),
                       "trainable": sum(p.numel() for p in params)}
    return cases


def train_step(case: dict, pixels_u8: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
    from lora_cli.tasks.data.image_batches import normalize_pixels

    pixel_values = normalize_pixels(pixels_u8, MEAN, STD)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = case["model"](pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    case["opt"].step()
    case["opt"].zero_grad(set_to_none=True)


def step_bench(config, device, args, peak: float) -> dict:
    size = config.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=gen)
    pixels = pixels.permute(0, 3, 1, 2).to(device)  # uint8, channels_last, as the collate makes it
    labels = torch.randint(0, config.num_labels, (args.batch,), generator=gen).to(device)
    flops = step_flops(config)
    out = {"flops_per_image": flops}
    for precision in ("autocast", "bf16-base"):
        cases = build_cases(config, device, precision)
        for case in cases.values():
            for _ in range(args.warmup):
                train_step(case, pixels, labels, device)
        sync(device)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    train_step(case, pixels, labels, device)
                sync(device)
                rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
        ratios = [a / b for a, b in zip(rates["loracli"], rates["peft"])]
        out[precision] = {
            name: {"img_per_s": statistics.median(v), "mfu": statistics.median(v) * flops / (peak * 1e12),
                   "trainable": cases[name]["trainable"]} for name, v in rates.items()}
        out[precision]["loracli_over_peft"] = statistics.median(ratios)
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def normalize_check(device: torch.device) -> float:
    """normalize_pixels on ``device`` against the CPU path (max abs difference)."""
    from lora_cli.tasks.data.image_batches import normalize_pixels

    x = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    here = normalize_pixels(x.to(device), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).cpu()
    return float((here - normalize_pixels(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).abs().max())


# ---------------------------------------------------------------- loader
def loader_bench(config, device, args, work: Path) -> dict:
    import datasets

    from lora_cli.tasks.data.image_batches import ImageBatches, collate, loader_defaults
    from lora_cli.tasks.data.image_cache import decode_cache, train_short_side

    datasets.disable_progress_bars()
    files = make_photo_folder(work / "photos", args.images, long_side=args.photo_side)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [p for p, _ in files], "label": [lab for _, lab in files]},
                                    features=features)
    crop = config.image_size
    start = time.perf_counter()
    cached = decode_cache(ds, "image", size=train_short_side(crop), cache_dir=work / "cache",
                          num_proc=max(1, os.cpu_count() or 1))
    out = {"images": len(ds), "cache_build_s": time.perf_counter() - start, "workers": {}}
    case = build_cases(config, device, "autocast")["loracli"]
    rows = ImageBatches(cached, crop, train=True, seed=0)
    for workers in args.workers:
        kwargs = loader_defaults(workers + 1, cuda=device.type == "cuda")
        loader = torch.utils.data.DataLoader(
            rows, batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=collate,
            num_workers=kwargs["dataloader_num_workers"], persistent_workers=kwargs["dataloader_persistent_workers"],
            prefetch_factor=kwargs.get("dataloader_prefetch_factor"), pin_memory=kwargs["dataloader_pin_memory"])
        blocked = wall = 0.0
        steps = 0
        for epoch in range(args.epochs + 1):  # epoch 0 starts the workers: not counted
            rows.set_epoch(epoch)
            it = iter(loader)
            epoch_start, epoch_blocked = time.perf_counter(), 0.0
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                epoch_blocked += time.perf_counter() - t0
                if batch is None:
                    break
                train_step(case, batch["pixel_values"].to(device, non_blocking=True),
                           batch["labels"].to(device, non_blocking=True), device)
                sync(device)
                if epoch:
                    steps += 1
            if epoch:
                blocked += epoch_blocked
                wall += time.perf_counter() - epoch_start
        del loader
        out["workers"][str(workers)] = {"stall_fraction": blocked / wall, "img_per_s": steps * args.batch / wall,
                                        "steps": steps}
    return out


# ------------------------------------------------------------------ QLoRA
QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QLORA_VARIANTS = ("bf16", "nf4", "int8")


def llama_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=256, attn_implementation="sdpa")
    return LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, attn_implementation="sdpa")


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def load_variant(folder: Path, variant: str, device: torch.device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_cli.adapters import LoraConfig, get_adapter_model

    kwargs: dict = {"dtype": torch.bfloat16, "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}}
    if variant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    elif variant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    before = _allocated(device)
    base = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    weights = _allocated(device) - before
    torch.manual_seed(0)
    model = get_adapter_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=QLORA_TARGETS)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    return {"model": model, "opt": torch.optim.AdamW(params, lr=1e-4, **fused), "weights_bytes": weights,
            "trainable": sum(p.numel() for p in params)}


def lm_step(case: dict, ids: torch.Tensor, device: torch.device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = case["model"](input_ids=ids, labels=ids).loss
    loss.backward()
    case["opt"].step()
    case["opt"].zero_grad(set_to_none=True)
    return float(loss.detach())


def qlora_bench(device: torch.device, args, work: Path) -> dict:
    from transformers import LlamaForCausalLM

    config = llama_config(args.smoke)
    torch.manual_seed(0)
    folder = work / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    cases = {v: load_variant(folder, v, device) for v in QLORA_VARIANTS}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.lm_batch, args.seq), generator=gen).to(device)
    first = {name: lm_step(case, ids, device) for name, case in cases.items()}  # also the warm-up
    rates: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, int] = dict.fromkeys(cases, 0)
    for _ in range(args.rounds):
        for name, case in cases.items():
            sync(device)
            base = _allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                lm_step(case, ids, device)
            sync(device)
            rates[name].append(ids.numel() * args.steps / (time.perf_counter() - start))
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base)
    frozen = sum(p.numel() for p in cases["bf16"]["model"].get_base_model().parameters() if not p.requires_grad)
    out: dict = {"base_params": frozen, "tokens_per_step": ids.numel(), "variants": {}}
    for name, case in cases.items():
        out["variants"][name] = {
            "tokens_per_s": statistics.median(rates[name]), "weights_mb": case["weights_bytes"] / 2**20,
            "step_peak_mb": peaks[name] / 2**20, "first_loss": first[name], "trainable": case["trainable"]}
    for name in ("nf4", "int8"):
        out[f"{name}_over_bf16_speed"] = out["variants"][name]["tokens_per_s"] / out["variants"]["bf16"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, runs on the CPU in seconds")
    parser.add_argument("--out", help="folder for gpu.json (default: print only)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, help="steps per timed round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workers", help="comma-separated loader worker counts (default 8,16)")
    parser.add_argument("--images", type=int, help="JPEGs in the generated folder")
    parser.add_argument("--epochs", type=int, help="timed loader epochs per worker count")
    parser.add_argument("--seq", type=int, help="QLoRA part: tokens per sequence")
    parser.add_argument("--lm-batch", type=int, help="QLoRA part: sequences per step")
    parser.add_argument("--skip-qlora", action="store_true", help="leave out the QLoRA part")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = dict(batch=4 if smoke else 128, steps=2 if smoke else 20, rounds=2 if smoke else 3,
                    workers="0,1" if smoke else "8,16", images=16 if smoke else 4096, epochs=1 if smoke else 2,
                    seq=16 if smoke else 512, lm_batch=2 if smoke else 8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    args.warmup = 1 if smoke else 5
    args.photo_side = 64 if smoke else 512
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type != "cuda" and not smoke:
        parser.error("no CUDA device: run with --smoke to check the script on the CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = vit_config(smoke)
    figures: dict = {
        "date": datetime.date.today().isoformat(), "smoke": smoke, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(), "batch": args.batch,
    }
    t0 = time.perf_counter()
    figures["gemm_bf16_tflops"] = gemm_peak(device, 256 if smoke else 8192, 2 if smoke else 50)
    print(f"bf16 GEMM peak: {figures['gemm_bf16_tflops']:.4g} TFLOP/s", flush=True)
    figures["normalize_max_diff_vs_cpu"] = normalize_check(device)
    figures["step"] = step_bench(config, device, args, figures["gemm_bf16_tflops"])
    for precision in ("autocast", "bf16-base"):
        s = figures["step"][precision]
        print(f"step [{precision}]: loracli {s['loracli']['img_per_s']:.0f} img/s (MFU {s['loracli']['mfu']:.1%}), "
              f"peft {s['peft']['img_per_s']:.0f} img/s (MFU {s['peft']['mfu']:.1%}), "
              f"loracli/peft {s['loracli_over_peft']:.3f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        figures["loader"] = loader_bench(config, device, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for workers, v in figures["loader"]["workers"].items():
        print(f"loader, {workers} workers: stall {v['stall_fraction']:.1%}, {v['img_per_s']:.0f} img/s", flush=True)
    print(f"decode cache: {figures['loader']['images']} images in {figures['loader']['cache_build_s']:.1f} s")
    if not args.skip_qlora and importlib.util.find_spec("bitsandbytes") is None:
        figures["qlora"] = {"skipped": "bitsandbytes is not installed (pip install 'loracli[quant]')"}
        print(f"QLoRA part skipped: {figures['qlora']['skipped']}", flush=True)
    elif not args.skip_qlora:
        work = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
        try:
            figures["qlora"] = qlora_bench(device, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name, v in figures["qlora"]["variants"].items():
            print(f"LM step [{name}]: {v['tokens_per_s']:.0f} tokens/s, weights {v['weights_mb']:.0f} MiB, "
                  f"step peak {v['step_peak_mb']:.0f} MiB, first loss {v['first_loss']:.4f}", flush=True)
    figures["total_s"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
