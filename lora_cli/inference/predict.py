"""`loracli predict` minus printing: load a run or a merged model, hand the inputs to its task.

    loaded = load_for_predict(run_dir="runs/food101-lora")   # or model_dir="merged/"
    results = predict(loaded, ["cake.jpg", "photos/"], top_k=5)
    console.print(predictions_table(results))

Every task answers through its ``predict`` (:class:`lora_cli.tasks.Task`): image tasks take
files (``lora_cli.tasks.image_classification``), text tasks texts. A merged folder (``loracli merge``)
is loaded as a run is, its task from ``loracli.json`` (else its architecture).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_cli.atomic import atomic_file
from lora_cli.errors import UserInputError
from lora_cli.inference.loading import LoadedRun
from lora_cli.labels import resolve_labels
from lora_cli.tasks.image_classification import FilePrediction


def load_merged(model_dir: str | Path, device: str | None = None) -> LoadedRun:
    """A merged model folder (``loracli merge`` output) as a run: its task and prompt settings from
    ``loracli.json`` (else its architecture), model, processor or tokenizer and labels."""
    from types import SimpleNamespace

    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    from lora_cli.devices import resolve_device
    from lora_cli.inference.merge import MERGED_RECORD
    from lora_cli.recipe import ModelSection
    from lora_cli.recipe.data import data_section_for
    from lora_cli.task_kinds import CAUSAL_LM, IMAGE_CLASSIFICATION, SEQ2SEQ, SEQ_CLS
    from lora_cli.tasks import get_task
    from lora_cli.tasks.data.text_common import load_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserInputError(f"{model_dir} is not a model directory (no config.json); pass a folder written by `loracli merge`")
    record_file = model_dir / MERGED_RECORD
    try:
        record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read the model in {model_dir}: {exc}") from None
    architectures = " ".join(getattr(config, "architectures", None) or [])
    task = record.get("task") or (
        IMAGE_CLASSIFICATION if "ImageClassification" in architectures
        else SEQ_CLS if "SequenceClassification" in architectures
        else SEQ2SEQ if getattr(config, "is_encoder_decoder", False)
        else CAUSAL_LM if ("CausalLM" in architectures or "LMHead" in architectures) else None
    )
    classes = {CAUSAL_LM: AutoModelForCausalLM, SEQ2SEQ: AutoModelForSeq2SeqLM, SEQ_CLS: AutoModelForSequenceClassification,
               IMAGE_CLASSIFICATION: AutoModelForImageClassification}
    if task not in classes:
        raise UserInputError(f"{model_dir} holds a {architectures or 'model'} that is no model loracli merges "
                             "(image-classification, causal-lm, seq-cls, seq2seq)")
    try:
        model = classes[task].from_pretrained(model_dir)
        if task == IMAGE_CLASSIFICATION:
            processor = AutoImageProcessor.from_pretrained(model_dir)
        else:
            processor = load_tokenizer(ModelSection(), source=model_dir)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load the model in {model_dir}: {exc}") from None
    data = data_section_for(task).model_construct(**(record.get("data") or {}))
    recipe = SimpleNamespace(task=task, data=data, seed=0, adapter=SimpleNamespace(method="merged"))
    model.to(resolve_device(device)).eval()
    return LoadedRun(model_dir, recipe, model, processor, get_task(task), resolve_labels(None, model) or None)


def load_for_predict(run_dir: str | Path | None = None, model_dir: str | Path | None = None, *, texts: bool = False,
                     scalings: bool = False, device: str | None = None) -> LoadedRun:
    """The run (or merged model) ``predict`` asks, refused when its inputs do not fit it: image paths
    for an image task, texts (``texts``) for a text task."""
    from lora_cli.inference.loading import load_run

    if (run_dir is None) == (model_dir is None):
        raise UserInputError("pass exactly one of --run RUN_DIR or --model MERGED_DIR")
    if model_dir is not None and scalings:
        raise UserInputError("--scalings needs the --run of an X-LoRA run; a merged model has no experts")
    loaded = load_run(run_dir, device=device) if model_dir is None else load_merged(model_dir, device=device)
    source = run_dir if model_dir is None else model_dir
    if texts and loaded.task.KIND.inputs == "images":
        if model_dir is not None:
            architectures = " ".join(getattr(loaded.model.config, "architectures", None) or []) or "model"
            raise UserInputError(f"{model_dir} holds a {architectures} that is no text model loracli merges (causal-lm, "
                                 "seq-cls, seq2seq); image models take image paths instead of --text / --prompt")
        raise UserInputError(f"--text/--prompt are for text runs; {source} is a {loaded.task.KIND.name} run: pass "
                             "image paths instead")
    if not texts and loaded.task.KIND.inputs != "images":
        raise UserInputError(
            f"{source} is a {loaded.recipe.task} run: give it text with --text (seq-cls, seq2seq) or --prompt "
            "(causal-lm) instead of image paths"
        )
    return loaded


def predict(loaded: LoadedRun, inputs: list[Any], *, scalings: bool = False, **options: Any) -> list[Any]:
    """The task's answer per input (:meth:`lora_cli.tasks.Task.predict`); ``scalings`` (X-LoRA runs)
    adds each text row's expert weights, see :func:`expert_scalings`."""
    weights = expert_scalings(loaded, inputs) if scalings else None  # refused before any generation
    rows = loaded.task.predict(loaded, list(inputs), **options)
    for row, found in zip(rows, weights or [], strict=False):
        row["scalings"] = found
    return rows


def expert_scalings(loaded: Any, texts: list[str]) -> list[dict[str, Any]]:
    """X-LoRA runs: per text, each token's weight of each expert (mean over the LoRA layers,
    before global_scaling_weight) and the mean over the tokens."""
    from lora_cli.tasks.data.text_common import text_positions

    model = loaded.model
    if not hasattr(model, "token_scalings"):
        raise UserInputError(f"--scalings is for X-LoRA runs (adapter.method: xlora); {loaded.run_dir} is a "
                             f"{loaded.recipe.adapter.method} run: leave --scalings out")
    device = next(model.parameters()).device
    room = text_positions(model)  # a prompt past the model's positions: its end, as generation reads it
    out = []
    for text in texts:
        side, loaded.processor.truncation_side = loaded.processor.truncation_side, "left"
        try:
            encoded = loaded.processor(text, return_tensors="pt", truncation=room is not None, max_length=room)
        finally:
            loaded.processor.truncation_side = side
        batch = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask") if k in encoded}
        weights = model.token_scalings(batch)[0].mean(1)  # (tokens, experts)
        tokens = loaded.processor.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        out.append({"experts": list(model.expert_names), "tokens": tokens, "per_token": weights.tolist(),
                    "mean": dict(zip(model.expert_names, weights.mean(0).tolist()))})
    return out


# ---------------------------------------------------------------- renderers
def predictions_table(results: Sequence[FilePrediction], title: str | None = None):
    """A rich table: one row per file, one column per rank ("label: prob").

    File names, labels and errors are user data: control characters and bidi overrides
    are shown escaped (:func:`lora_cli.safe_text.terminal_text`), rich markup escaped."""
    from rich.table import Table

    from lora_cli.safe_text import rich_text as escape

    k = max((len(r.labels) for r in results), default=1)
    names = [r.file for r in results]
    try:
        common = os.path.commonpath([os.path.dirname(n) for n in names]) if len(names) > 1 else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common:
        names = [os.path.relpath(n, common) for n in names]
        title = title or f"predictions for files in {common}"
    table = Table(title=escape(title) if title else None, show_lines=False)
    table.add_column("file", overflow="fold")
    for rank in range(1, k + 1):
        table.add_column(f"top-{rank}" if k > 1 else "prediction")
    for r, name in zip(results, names, strict=True):
        if r.ok:
            cells = [f"{escape(lab)}: {p:.3f}" for lab, p in zip(r.labels, r.probabilities, strict=True)]
            table.add_row(escape(name), *cells)
        else:
            table.add_row(escape(name), f"[red]error: {escape(r.error or '')}[/red]", *[""] * (k - 1))
    return table


def predictions_json(results: Sequence[FilePrediction]) -> list[dict[str, Any]]:
    """A list of ``{"file", "top_k": [{"label", "probability"}], "error"}`` objects."""
    return [r.to_dict() for r in results]


def write_predictions_csv(results: Sequence[FilePrediction], path: str | Path) -> Path:
    """One row per file: file, label_1, probability_1, ..., label_k, probability_k, error.

    Text cells are neutralised for spreadsheets (:func:`lora_cli.safe_text.csv_cell`: a
    leading ``=``/``+``/``-``/``@`` gets a ``'``, control characters are escaped); the raw
    values are in ``--json``."""
    from lora_cli.safe_text import csv_cell

    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise UserInputError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UserInputError(f"--csv {path} is a folder; give a file name such as predictions.csv")
    if path.exists() and path.resolve() in {Path(r.file).resolve() for r in results}:
        raise UserInputError(f"--csv {path} is one of the images being predicted; writing there would destroy it. "
                             "Give another file name, such as predictions.csv")
    k = max((len(r.labels) for r in results), default=0)
    header = ["file"]
    for rank in range(1, k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    header.append("error")
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in results:
            row: list[Any] = [csv_cell(r.file)]
            for rank in range(k):
                if rank < len(r.labels):
                    row += [csv_cell(r.labels[rank]), f"{r.probabilities[rank]:.6f}"]
                else:
                    row += ["", ""]
            row.append(csv_cell(r.error or ""))
            writer.writerow(row)
    return path
