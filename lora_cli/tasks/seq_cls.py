"""Sequence classification: text (and an optional second text) -> one of N labels.

rows -> labels as a ClassLabel (sorted names when the data has plain strings/ints) ->
tokens (truncated to data.max_length) -> padded batches -> AutoModelForSequenceClassification.

The classification head is new, so it trains in full and must be saved with the adapter:
:func:`heads` names it and the pipeline puts it in modules_to_save. A run reloaded without
its trained head predicts at chance, which is why the tests reload and compare predictions.
Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.hf_names import classification_heads
from lora_cli.labels import label_maps, resolve_labels
from lora_cli.recipe import ModelSection, SeqClsData
from lora_cli.task_kinds import SEQ_CLS, TASK_KINDS
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data import text_common as tc
from lora_cli.tasks.data.text_common import load_processor, make_collator, synthetic_batch  # noqa: F401 - the task interface

KIND = TASK_KINDS[SEQ_CLS]
generation_metrics = None
device_inputs = None
preprocess_logits_for_metrics = None


# ------------------------------------------------------------------------- data
def load_raw(data: SeqClsData, seed: int) -> tuple[data_mod.Splits, list[str]]:
    columns = {"data.text_column": data.text_column, "data.label_column": data.label_column}
    if data.text_pair_column:
        columns["data.text_pair_column"] = data.text_pair_column
    splits = tc.load_splits(data, seed, columns, stratify=data.label_column)
    labels = data_mod.encode_labels(splits, data.label_column)
    return splits, labels


def build_model(model: ModelSection, labels: list[str] | None, source=None):
    from transformers import AutoModelForSequenceClassification

    if not labels:
        raise UserInputError("seq-cls needs the label names (adapter/label_map.json is missing from the run)")
    id2label, label2id = label_maps(labels)
    kwargs: dict[str, Any] = {"num_labels": len(labels), "id2label": id2label, "label2id": label2id}
    if model.name_or_path and not source:
        kwargs["ignore_mismatched_sizes"] = True  # a pretrained head with other classes is replaced
    return tc.build_model(model, AutoModelForSequenceClassification, source, **kwargs)


def heads(model) -> list[str]:
    """The new classification head(s): trained in full and saved beside the adapter."""
    return classification_heads(model)


def _tokenize(ds, tokenizer, data: SeqClsData):
    def encode(row: dict[str, Any]) -> dict[str, Any]:
        pair = str(row[data.text_pair_column]) if data.text_pair_column else None
        enc = tokenizer(str(row[data.text_column]), pair, truncation=True, max_length=data.max_length)
        out = {"input_ids": enc["input_ids"], "labels": int(row[data.label_column])}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    return tc.tokenize_map(ds, encode, desc="tokenizing")


def prepare(splits: data_mod.Splits, processor, data: SeqClsData, seed: int):
    return _tokenize(splits.train, processor, data), _tokenize(splits.eval, processor, data)


# ------------------------------------------------------------------ metrics
def compute_metrics(eval_pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits = eval_pred.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    preds = np.argmax(logits, axis=-1)
    labels = np.asarray(eval_pred.label_ids)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0)),
    }


def eval_dataset(data: SeqClsData, seed: int, processor, split: str = "validation", limit: int | None = None):
    splits, _ = load_raw(data, seed)
    ds = splits.train if split == "train" else splits.eval
    return _tokenize(data_mod.limit(ds, limit, seed), processor, data)


# ------------------------------------------------------------------ predict
def class_probabilities(model, tokenizer, texts: list[str], pairs: list[str] | None = None,
                        max_length: int | None = None, note_option: str | None = None) -> torch.Tensor:
    """(len(texts), num_labels) softmax probabilities. Inputs are cut to ``max_length`` tokens and to the
    model's positions; with ``note_option`` (predict's ``--text``) each cut input is named in a warning."""
    positions = tc.text_positions(model)
    limits = [x for x in (max_length, positions) if x is not None]
    limit = min(limits) if limits else None
    if limit is not None and note_option is not None:
        why = (f"the run reads at most {limit} (data.max_length)" if limit == max_length
               else f"the model has {limit} positions")
        for i, ids in enumerate(tokenizer(texts, pairs)["input_ids"]):
            if len(ids) > limit:
                tc.note_cut(note_option, i, len(ids), limit, why, "last")
    enc = tokenizer(texts, pairs, truncation=True, max_length=limit, padding=True,
                    return_tensors="pt").to(model_device(model))
    enc = tc.model_inputs(model, enc)
    with torch.no_grad():
        logits = model(**enc).logits
    return logits.float().softmax(dim=-1).cpu()


def classify_text(run, text: str | list[str], top_k: int = 5, text_pair: str | list[str] | None = None):
    """The ``top_k`` labels with their probabilities, best first: [{"label", "score"}] per text.

    ``run`` is a LoadedRun (:func:`lora_cli.inference.loading.load_run`). A single string gives one list; a list gives one per text.
    """
    if top_k < 1:
        raise UserInputError(f"top_k must be at least 1, got {top_k}")
    texts = [text] if isinstance(text, str) else list(text)
    pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
    id2label = resolve_labels(run.id2label, run.model)
    probs = class_probabilities(run.model, run.processor, texts, pairs, max_length=run.recipe.data.max_length,
                                note_option="--text")
    k = min(top_k, probs.shape[-1])
    scores, idx = probs.topk(k, dim=-1)
    out = [
        [{"label": id2label[int(i)], "score": float(s)} for s, i in zip(row_s, row_i)]
        for row_s, row_i in zip(scores.tolist(), idx.tolist())
    ]
    return out[0] if isinstance(text, str) else out


def predict(run, inputs: list[str], *, top_k: int = 5, **_) -> list[dict]:
    """``predict --text``: the ``top_k`` labels per text (see :func:`classify_text`)."""
    return [{"text": t, "top_k": row} for t, row in zip(inputs, classify_text(run, list(inputs), top_k=top_k), strict=True)]
