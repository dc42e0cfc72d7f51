"""Export a run as an ONNX model: merge (verified), export with ``torch.onnx``, prove it in ONNX Runtime.

    report = export_run("runs/quickstart", "quickstart-onnx/")
    # quickstart-onnx/model.onnx, config.json (labels), the processor / tokenizer, export.json

Three models, two checks. The run's adapter model is the reference; :func:`merge_run` folds
the adapter into the base and verifies the merged logits against it (float32 tolerance of
:mod:`lora_cli.inference.merge`). The merged model is read back from the folder it wrote,
exported, and ONNX Runtime's logits on the same validation inputs must match the merged
PyTorch model's within the float32 tolerance, ``1e-4 + 1e-5 * max|logit|``, with the same
top-1 class except near-ties. ONNX Runtime fuses and reorders float32 operations, so
differences of about 1e-6 are normal; a wrong export differs in the first digit.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript, opset 18) first,
the TorchScript exporter (opset 17) when that fails; the report names the one used.
Inputs get a dynamic batch axis and, for token inputs, a dynamic sequence axis.

Everything is built in a temporary sibling of the output folder and renamed into place only
once both checks pass (:func:`lora_cli.atomic.atomic_dir`): a failed check writes nothing.
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_cli import rundir as rd
from lora_cli.atomic import atomic_dir
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.inference.merge import (
    MERGE_FILE,
    MergeReport,
    compare_logits,
    merge_run,
    verification_batch,
)
from lora_cli.recipe import load_recipe

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "gguf")
"""onnx: this module; gguf: :mod:`lora_cli.inference.gguf_export` (llama.cpp)."""
EXPORTERS = ("auto", "dynamo", "torchscript")
AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "seq-cls": "AutoModelForSequenceClassification",
}
"""Tasks whose runs export: one logits output per input row."""
MODEL_FILE = "model.onnx"
REPORT_FILE = "export.json"
SINGLE_FILE_LIMIT = 1_800_000_000
"""Bytes of weights up to which model.onnx holds them itself (protobuf's limit is 2 GiB);
larger models keep them in ``model.onnx.data`` beside it."""
INSTALL_HINT = "install the export extra: pip install 'loracli[export]' (onnx, onnxruntime, onnxscript)"
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
"""A full disk, a read-only or forbidden folder: write failures that no other exporter avoids."""


class ExportVerificationError(LoraCliError):
    """ONNX Runtime does not reproduce the PyTorch model; nothing was written."""


@dataclass
class ExportReport:
    out_dir: str
    exporter: str
    opset: int | None
    input_names: list[str]
    inputs: str
    num_inputs: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    merge: MergeReport

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"merge verified (max |logit diff| {self.merge.max_abs_diff:.3g}); ONNX ({self.exporter} exporter, "
            f"opset {self.opset}) verified in ONNX Runtime on {self.num_inputs} {self.inputs} input(s): max |logit diff| "
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), top-1 agreement {self.top1_agreement:.1%}; "
            f"written to {self.out_dir}"
        )


def default_out_dir(run_dir: str | Path) -> Path:
    """``runs/NAME`` -> ``runs/NAME-onnx``, beside the run (never inside it)."""
    return rd.beside_run(run_dir, "onnx")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    fmt: str = "onnx",
    n: int = 16,
    force: bool = False,
    exporter: str = "auto",
    opset: int | None = None,
    merged: bool = False,
    dtype: str | None = None,
) -> Any:
    """Merge the run's adapter, export the merged model, verify it in ONNX Runtime, write ``out_dir``.

    ``fmt="gguf"``: the adapter (or with ``merged`` the merged model, ``dtype`` float32 / float16)
    for llama.cpp, see :func:`lora_cli.inference.gguf_export.export_gguf`."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        if exporter != "auto" or opset is not None:
            raise UserInputError("--exporter and --opset are options of --format onnx; drop them for --format gguf")
        from lora_cli.inference.gguf_export import export_gguf

        return export_gguf(run_dir, out_dir, merged=merged, dtype=dtype or "float32", n=n, force=force)
    if merged or dtype is not None:
        raise UserInputError("--merged and --dtype are options of --format gguf (the ONNX export is always a merged "
                             "float32 model); drop them for --format onnx")
    if exporter not in EXPORTERS:
        raise UserInputError(f"--exporter {exporter!r} is not supported; choose one of {', '.join(EXPORTERS)}")
    if n < 1:
        raise UserInputError(f"--n must be at least 1 (validation inputs that verify the export), got {n}")
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserInputError(f"loracli export needs {', '.join(missing)}: {INSTALL_HINT}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dir)
    replace = rd.check_output_dir(out, rd.Output("--out", "export", REPORT_FILE, f"{default_out_dir(run_dir)}/"),
                                  reads=[run_dir], replace=force)  # before the slow model load
    rd.check_run_links(run_dir)
    _check_task(run_dir)

    loaded = load_run(run_dir, device="cpu")
    batch, source = verification_batch(loaded, n)
    import transformers

    auto_cls = getattr(transformers, AUTO_CLASSES[loaded.recipe.task])
    with atomic_dir(out, replace=replace) as staging:
        merged_dir = staging / ".merged"
        merge_report = merge_run(loaded.model, loaded.processor, merged_dir, dtype="float32", verify_batch=batch,
                                 n=n, id2label=loaded.id2label, source=source, run_dir=run_dir)
        merged = auto_cls.from_pretrained(merged_dir).eval()
        inputs = export_inputs(merged, batch, n)
        used, used_opset = export_onnx(merged, inputs, staging / MODEL_FILE, exporter=exporter, opset=opset)
        diff, tolerance, agreement, ok = verify_onnx(staging / MODEL_FILE, merged, inputs)
        rows = len(next(iter(inputs.values())))
        if not ok:
            raise ExportVerificationError(
                f"ONNX Runtime does not reproduce the merged model on {rows} {merge_report.inputs} input(s): max "
                f"|logit diff| {diff:.3g} > tolerance {tolerance:.3g} or top-1 agreement {agreement:.1%} "
                f"({used} exporter); nothing written. Try --exporter "
                f"{'torchscript' if used == 'dynamo' else 'dynamo'}, or report this as a bug"
            )
        for item in merged_dir.iterdir():  # config (labels) and processor files; the weights are in model.onnx
            if not item.name.endswith(".safetensors") and item.name not in ("model.safetensors.index.json", MERGE_FILE):
                shutil.move(str(item), staging / item.name)
        shutil.rmtree(merged_dir)
        merge_report.out_dir = str(out)
        report = ExportReport(str(out), used, used_opset, list(inputs), merge_report.inputs, rows, diff, tolerance,
                              agreement, merge_report)
        rd.write_json(staging / REPORT_FILE, report.to_dict())
    return report


def _check_task(run_dir: Path) -> None:
    recipe_file = run_dir / rd.RECIPE_FILE
    if not recipe_file.is_file():
        return  # load_run says what is wrong with the folder
    task = load_recipe(recipe_file).task
    if task not in AUTO_CLASSES:
        raise UserInputError(
            f"{run_dir} is a {task} run; ONNX export covers {' and '.join(AUTO_CLASSES)} runs (one logits output "
            "per input). Write a plain transformers folder with `loracli merge RUN --out DIR` instead"
        )


def export_inputs(model: nn.Module, batch: Any, n: int) -> dict[str, torch.Tensor]:
    """The model inputs of a collated batch (no labels), first ``n`` rows, in forward's order."""
    batch = {"pixel_values": batch} if torch.is_tensor(batch) else dict(batch)
    accepted = list(inspect.signature(model.forward).parameters)
    names = [k for k in accepted if k in batch and k != "labels" and torch.is_tensor(batch[k])]
    if not names:
        raise LoraCliError(f"the verification batch has none of the model's inputs ({', '.join(batch)})")
    return {k: batch[k][:n].contiguous() for k in names}


class _KeywordLogits(nn.Module):
    """``model(**inputs).logits``: what the dynamo exporter traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits


class _PositionalLogits(nn.Module):
    """The same with positional inputs, for the TorchScript tracer."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def _axes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch axis dynamic everywhere; the sequence axis too for token inputs (batch, tokens)."""
    return {k: {0: "batch", 1: "sequence"} if v.dim() == 2 else {0: "batch"} for k, v in inputs.items()}


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path, exporter: str = "auto",
                opset: int | None = None) -> tuple[str, int | None]:
    """Write ``path``; return (exporter used, opset)."""
    if len(next(iter(inputs.values()))) < 2:  # torch.export specialises a dimension of size 1
        inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
    names = list(inputs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    errors = []
    for kind in (("dynamo", "torchscript") if exporter == "auto" else (exporter,)):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporters' notes to torch developers
                if kind == "dynamo":
                    torch.onnx.export(_KeywordLogits(model).eval(), (), str(path), kwargs=inputs, input_names=names,
                                      output_names=["logits"], dynamic_shapes=_axes(inputs), dynamo=True,
                                      opset_version=opset, external_data=weights > SINGLE_FILE_LIMIT, verbose=False)
                else:
                    torch.onnx.export(_PositionalLogits(model, names).eval(), tuple(inputs.values()), str(path),
                                      input_names=names, output_names=["logits"], opset_version=opset or 17,
                                      dynamic_axes={**_axes(inputs), "logits": {0: "batch"}}, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next, report all
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
                raise  # the disk, not the exporter: atomic_dir says so, and no other exporter would do better
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            errors.append(f"{kind}: {type(exc).__name__}: {first}")
            logger.warning("the %s ONNX exporter failed (%s)", kind, first)
            for leftover in path.parent.glob(f"{path.name}*"):
                leftover.unlink()
            continue
        return kind, _opset(path)
    raise LoraCliError(
        f"torch.onnx could not export this model ({'; '.join(errors)}); nothing written. Use `loracli merge RUN "
        "--out DIR` for a transformers folder, or run with --debug for the exporter's trace"
    )


def _opset(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def verify_onnx(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float, float, bool]:
    """(max abs diff, tolerance, top-1 agreement, ok) of ONNX Runtime against ``model`` in PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    unknown = [name for name in wanted if name not in inputs]
    if unknown:
        raise LoraCliError(f"the exported graph wants inputs the model was not given: {', '.join(unknown)}")
    feed = {name: inputs[name].cpu().numpy() for name in wanted}
    onnx_logits = torch.from_numpy(session.run(["logits"], feed)[0]).float()
    with torch.inference_mode():
        reference = model(**inputs).logits.float()
    if onnx_logits.shape != reference.shape:
        return float("inf"), 0.0, 0.0, False
    return compare_logits(reference, onnx_logits, "float32")
