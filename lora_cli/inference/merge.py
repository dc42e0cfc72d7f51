"""Merge a trained adapter into its base model, prove the merge, write a plain model folder.

    report = merge_run(adapter_model, processor, "merged/", dtype="float16", verify_batch=pixels)
    # merged/ loads with AutoModelForImageClassification.from_pretrained: no loracli, no peft

Verification: the adapter model's logits on the verification inputs are the reference;
after ``merge_and_unload(safe_merge=True)`` and the cast to ``dtype`` the merged model's
logits must match within the dtype's tolerance, and its top-1 class must agree on every
input except near-ties (where the reference's margin between the two classes is itself
within the tolerance). Tolerance on logits: ``atol + rtol * max|reference logit|`` with

    float32  atol 1e-4, rtol 1e-5   (only summation order changes: a merge bug shows)
    float16  atol 1e-2, rtol 1e-2   (11-bit mantissa; error accumulates over the layers)
    bfloat16 atol 5e-2, rtol 5e-2   (8-bit mantissa)

A quantized base (``model.quantization``, QLoRA) is dequantized first: every bitsandbytes
4-bit / 8-bit linear becomes a float32 ``nn.Linear`` holding the weight it computed with, the
adapters merge into that, and the folder written is a plain full-precision model (no
``quantization_config``). The reference is then the adapter model on the dequantized base,
so the check proves the merge itself; how far dequantizing moved the logits (the 4-bit
kernel's compute dtype, int8 activations) is logged beside it.

On failure nothing is written. The folder is written into a temporary sibling and renamed
into place, so a crash never leaves a half-written model where ``--out`` points.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_cli import rundir as rd
from lora_cli.adapters.quantized import dequantize_model
from lora_cli.atomic import atomic_dir
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.labels import label_maps

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCES = {"float32": (1e-4, 1e-5), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
"""dtype -> (atol, rtol) on logits."""


class MergeVerificationError(LoraCliError):
    """The merged model does not reproduce the adapter model; nothing was written."""


@dataclass
class MergeReport:
    out_dir: str
    dtype: str
    inputs: str
    """"validation" (real images) or "synthetic" (noise images of the model's input size)."""
    num_inputs: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"verified on {self.num_inputs} {self.inputs} input(s): max |logit diff| "
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), top-1 agreement "
            f"{self.top1_agreement:.1%}; {self.dtype} model written to {self.out_dir}"
        )


MERGE_FILE = "merge.json"
"""The verification report a merge writes beside the model: it also marks the folder as
merge's own, the only kind ``merge --force`` replaces."""


def check_out_dir(out_dir: str | Path, force: bool = False, run_dir: str | Path | None = None) -> Path:
    """Refuse a target that would destroy data; say so before any work is done.

    The folder rule of :mod:`lora_cli.rundir.guard`: never the run being merged, one of its
    own entries, an ancestor of it, a folder holding the working directory; an existing
    non-empty folder only with ``force`` and only when an earlier merge wrote it
    (``merge.json``) and it holds no run.
    """
    out_dir = Path(out_dir)
    _replaces(out_dir, force, run_dir)
    return out_dir


def _replaces(out_dir: Path, force: bool, run_dir: str | Path | None) -> bool:
    """:func:`check_out_dir`'s check; True when ``out_dir`` is an earlier merge to replace."""
    from lora_cli import rundir as rd

    return rd.check_output_dir(out_dir, rd.Output("--out", "merge", MERGE_FILE, "merged/"),
                               reads=[run_dir] if run_dir is not None else [], replace=force)


def synthetic_inputs(model: nn.Module, processor: Any, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Noise images of the model's input size, through the processor's eval transforms."""
    from PIL import Image

    config = getattr(model, "config", None)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    rng = np.random.default_rng(seed)
    if processor is None:
        channels = getattr(config, "num_channels", 3)
        return torch.from_numpy(rng.standard_normal((n, channels, height, width)).astype(np.float32))
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _logits(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for pixel values, or for a dict of model inputs (token ids, masks, labels)."""
    param = next(model.parameters())
    if torch.is_tensor(inputs):
        inputs = {"pixel_values": inputs}
    moved = {
        k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
        for k, v in inputs.items()
    }
    with torch.inference_mode():
        out = model(**moved).logits
    return out.float().cpu()


def _rows(inputs: torch.Tensor | dict[str, torch.Tensor], n: int):
    """The first ``n`` rows of a tensor or of every tensor in a dict."""
    if torch.is_tensor(inputs):
        return inputs[:n]
    return {k: v[:n] for k, v in inputs.items()}


def _count(inputs) -> int:
    return len(inputs) if torch.is_tensor(inputs) else len(next(iter(inputs.values())))


def compare_logits(reference: torch.Tensor, merged: torch.Tensor, dtype: str) -> tuple[float, float, float, bool]:
    """(max abs diff, tolerance, top-1 agreement, ok) of merged against reference logits."""
    atol, rtol = TOLERANCES[dtype]
    # language models give (batch, tokens, vocab): every position is one row to compare
    reference, merged = reference.reshape(-1, reference.shape[-1]), merged.reshape(-1, merged.shape[-1])
    tolerance = atol + rtol * float(reference.abs().max())
    diff = float((reference - merged).abs().max())
    ref_top, merged_top = reference.argmax(-1), merged.argmax(-1)
    agree = ref_top == merged_top
    # a flipped top-1 is acceptable only where the reference itself nearly ties the two classes
    rows = torch.arange(len(reference))
    margin = reference[rows, ref_top] - reference[rows, merged_top]
    near_tie = margin <= tolerance
    ok = bool(torch.isfinite(merged).all()) and diff <= tolerance and bool((agree | near_tie).all())
    return diff, tolerance, float(agree.float().mean()), ok


def merge_run(
    model: nn.Module,
    processor: Any,
    out_dir: str | Path,
    dtype: str = "float32",
    verify_batch: torch.Tensor | dict[str, torch.Tensor] | None = None,
    n: int = 16,
    force: bool = False,
    id2label: dict[int, str] | None = None,
    source: str = "validation",
    run_dir: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
    generation: dict[str, Any] | None = None,
) -> MergeReport:
    """Merge ``model`` (an AdapterModel), verify, and save a transformers model folder.

    ``verify_batch``: pixel values of real (validation) images; its first ``n`` rows are
    used. Without it, ``n`` synthetic noise images are used and the report says so. The
    AdapterModel is consumed: its adapters are merged in place. ``extra_files`` (name -> text) are
    written into the folder with the model; ``generation`` sets fields of its generation config
    (the token ids a chat model stops at).
    """
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if n < 1:
        raise UserInputError(f"the number of verification inputs must be at least 1, got {n}")
    out_dir = check_out_dir(out_dir, force, run_dir=run_dir)
    if not hasattr(model, "merge_and_unload"):
        raise UserInputError("the model has no adapter to merge (expected a loracli AdapterModel)")
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if getattr(config, "merge_refusal", None):  # e.g. p-tuning: nothing to fold into the weights
        raise UserInputError(f"cannot merge: a {config.method} adapter {config.merge_refusal}; nothing written")

    if verify_batch is not None and _count(verify_batch) > 0:
        inputs = _rows(verify_batch, n)
    else:
        inputs, source = synthetic_inputs(model, processor, n), "synthetic"
        logger.info("no validation images reachable; verifying the merge on %d synthetic inputs", n)

    model.eval()
    reference = _logits(model, inputs)
    if not torch.isfinite(reference).all():
        raise MergeVerificationError(
            "the adapter model itself produces NaN/inf logits; the adapter is broken (re-train it); nothing written"
        )
    dequantized = dequantize_model(model)  # QLoRA: merge into full precision, never into 4-bit weights
    if dequantized:
        quantized_reference, reference = reference, _logits(model, inputs)
        logger.info(
            "dequantized %d bitsandbytes layer(s) to float32 before merging; that moved the adapter model's "
            "logits by at most %.3g (the quantized forward's own rounding, not the merge)",
            len(dequantized), float((quantized_reference - reference).abs().max()),
        )
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except LoraCliError as exc:
        raise MergeVerificationError(f"{exc}; nothing written") from exc
    bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MergeVerificationError(f"merged weights contain NaN/inf (e.g. {bad[0]}); nothing written")
    merged.to(DTYPES[dtype]).eval()
    merged_logits = _logits(merged, inputs)
    diff, tolerance, agreement, ok = compare_logits(reference, merged_logits, dtype)
    report = MergeReport(str(out_dir), dtype, source, _count(inputs), diff, tolerance, agreement)
    if not ok:
        raise MergeVerificationError(
            f"the merged {dtype} model does not reproduce the adapter model on {_count(inputs)} {source} "
            f"input(s): max |logit diff| {diff:.3g} > tolerance {tolerance:.3g} or top-1 agreement "
            f"{agreement:.1%}; nothing written (try --dtype float32, or report this as a bug)"
        )

    config = getattr(merged, "config", None)
    if config is not None and id2label:
        config.id2label, config.label2id = label_maps(id2label)
    if generation and getattr(merged, "generation_config", None) is not None:
        for key, value in generation.items():
            setattr(merged.generation_config, key, value)
    write_model_dir(merged, processor, out_dir, force=force, run_dir=run_dir, report=report.to_dict(),
                    extra_files=extra_files)
    return report


def write_model_dir(
    model: nn.Module, processor: Any, out_dir: str | Path, force: bool = False, run_dir: str | Path | None = None,
    report: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``save_pretrained`` model (safetensors), processor and ``merge.json`` into a temp sibling, then rename."""
    import json

    out_dir = Path(out_dir)
    replace = _replaces(out_dir, force, run_dir)
    with atomic_dir(out_dir, replace=replace) as tmp:  # an earlier merge stays until the new one is complete
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / MERGE_FILE).write_text(json.dumps(report or {}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
    return out_dir


# ------------------------------------------------------------ merge a run (`loracli merge`)
def verification_batch(loaded: Any, n: int):
    """(inputs, source): up to ``n`` collated validation rows, or the task's synthetic inputs
    (source "synthetic") when the data is not reachable."""
    recipe, task = loaded.recipe, loaded.task
    try:
        dataset = task.eval_dataset(recipe.data, recipe.seed, loaded.processor, split="validation", limit=n)
        rows = [dataset[i] for i in range(min(n, len(dataset)))]
        if rows:
            return task.make_collator(loaded.processor, recipe.data)(rows), "validation"
    except (LoraCliError, OSError, ValueError, KeyError, ImportError) as exc:
        logger.info("validation data not reachable (%s); using synthetic inputs", exc)
    return loaded.task.synthetic_batch(loaded.processor, n), "synthetic"


def refuse_unmergeable(adapter_dir: Path) -> None:
    """A method with nothing to merge (p-tuning) says so before the model is loaded."""
    from lora_cli.adapters import AdapterConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        return  # load_run explains the missing adapter
    config = AdapterConfig.from_pretrained(adapter_dir)
    if getattr(config, "merge_refusal", None):
        raise UserInputError(f"{adapter_dir.parent}: cannot merge: a {config.method} adapter {config.merge_refusal}")


def merge_from_run(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    n: int = 16,
    force: bool = False,
    device: str | None = None,
):
    """Merge the run's adapter into its base model and write ``out_dir`` (see merge_run)."""
    from lora_cli.inference.loading import load_run

    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    check_out_dir(out_dir, force, run_dir=run_dir)  # fail before the slow model load
    rd.check_run_links(run_dir)
    refuse_unmergeable(Path(run_dir) / rd.ADAPTER_DIR)
    loaded = load_run(run_dir, device=device)
    batch, source = verification_batch(loaded, n)
    return merge_run(
        loaded.model, loaded.processor, out_dir, dtype=dtype, verify_batch=batch, n=n, force=force,
        id2label=loaded.id2label, source=source, run_dir=run_dir,
        extra_files={MERGED_RECORD: json.dumps(merged_record(loaded), indent=2) + "\n"},
        generation=_generation_settings(loaded),
    )


MERGED_RECORD = "loracli.json"
"""What a merged folder keeps of its run for ``predict --model``: the task and the data settings
that shape a prompt (chat format, system prompt, source prefix, lengths)."""
PROMPT_KEYS = ("format", "system_prompt", "source_prefix", "source_lang", "target_lang", "source_column",
               "target_column", "max_length", "max_target_length", "prompt_column", "completion_column")


def merged_record(loaded: Any) -> dict[str, Any]:
    data = loaded.recipe.data
    kept = {k: getattr(data, k) for k in PROMPT_KEYS if getattr(data, k, None) is not None}
    return {"task": loaded.recipe.task, "data": kept}


def _generation_settings(loaded: Any) -> dict[str, Any] | None:
    """Chat runs: the merged model's generation config stops at the template's end of turn too."""
    if not getattr(loaded.recipe.data, "chat", False):
        return None
    from lora_cli.tasks.data import chat

    stop = chat.stop_ids(loaded.processor, loaded.processor.chat_template)
    return {"eos_token_id": stop, "pad_token_id": loaded.processor.pad_token_id} if stop else None
