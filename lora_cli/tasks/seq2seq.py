"""Sequence to sequence (translation, summarisation): source text -> target text, e.g. T5.

Rows are ``data.source_column`` / ``data.target_column`` pairs, or WMT16-style records
``translation: {de: ..., en: ...}`` read with ``data.source_lang`` / ``data.target_lang``.
Sources get ``data.source_prefix`` (default for translation: "translate German to English: ")
and are truncated to ``data.max_length``; targets to ``data.max_target_length``. Labels are
padded with -100; the model derives its decoder inputs from them.

Metrics. The Trainer's evaluation reports eval_loss and teacher-forced token accuracy,
which cost one forward pass. BLEU and chrF need generation, which is slow, so they are
computed once at the end of training on a few validation rows (:func:`generation_metrics`,
``eval_bleu`` / ``eval_chrf`` in eval.json, each row's input, reference and prediction in
eval_predictions.jsonl) and once by `loracli eval`, not at every evaluation step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.recipe import ModelSection, Seq2SeqData
from lora_cli.recipe.data import TRANSLATION_COLUMN
from lora_cli.task_kinds import SEQ2SEQ, TASK_KINDS
from lora_cli.tasks.base import generated_rows
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data import text_common as tc
from lora_cli.tasks.data.text_common import load_processor, make_collator  # noqa: F401 - the task interface

logger = logging.getLogger(__name__)

KIND = TASK_KINDS[SEQ2SEQ]
BLEU_ROWS = 32  # rows generated for the end-of-training BLEU
DEFAULT_NEW_TOKENS = 128
device_inputs = None

LANGUAGES = {
    "de": "German", "en": "English", "fr": "French", "ro": "Romanian", "cs": "Czech", "ru": "Russian",
    "fi": "Finnish", "tr": "Turkish", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
    "zh": "Chinese", "ja": "Japanese",
}


# ------------------------------------------------------------------------- data
def source_prefix(data: Seq2SeqData) -> str:
    if data.source_prefix is not None:
        return data.source_prefix
    if data.mode == "translation":
        src = LANGUAGES.get(data.source_lang, data.source_lang)
        tgt = LANGUAGES.get(data.target_lang, data.target_lang)
        return f"translate {src} to {tgt}: "
    return ""


def pairs(row: dict[str, Any], data: Seq2SeqData) -> tuple[str, str]:
    if data.mode == "columns":
        return str(row[data.source_column]), str(row[data.target_column])
    record = row[TRANSLATION_COLUMN]
    missing = [lang for lang in (data.source_lang, data.target_lang) if lang not in record]
    if missing:
        raise UserInputError(
            f"data.source_lang/target_lang: a {TRANSLATION_COLUMN!r} record has no {missing[0]!r} "
            f"(it has {', '.join(record)})"
        )
    return str(record[data.source_lang]), str(record[data.target_lang])


def load_raw(data: Seq2SeqData, seed: int) -> tuple[data_mod.Splits, None]:
    return tc.load_splits(data, seed, data.columns()), None


def build_model(model: ModelSection, labels=None, source=None):
    from transformers import AutoModelForSeq2SeqLM

    return tc.build_model(model, AutoModelForSeq2SeqLM, source)


def heads(model) -> list[str]:
    return []


def _tokenize(ds, tokenizer, data: Seq2SeqData):
    prefix = source_prefix(data)

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        src, tgt = pairs(row, data)
        ids = tokenizer(prefix + src, truncation=True, max_length=data.max_length)["input_ids"]
        labels = tokenizer(text_target=tgt, truncation=True, max_length=data.max_target_length)["input_ids"]
        return {"input_ids": ids, "labels": labels}

    return tc.tokenize_map(ds, encode, desc="tokenizing")


def prepare(splits: data_mod.Splits, processor, data: Seq2SeqData, seed: int):
    return _tokenize(splits.train, processor, data), _tokenize(splits.eval, processor, data)


# ------------------------------------------------------------------ metrics
def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
    """Keep the argmax token per position, not the whole vocabulary."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred) -> dict[str, float]:
    """Teacher-forced token accuracy over the non-padding target tokens."""
    preds = eval_pred.predictions
    if isinstance(preds, tuple):
        preds = preds[0]
    preds = np.asarray(preds)
    if preds.ndim == 3:
        preds = preds.argmax(-1)
    labels = np.asarray(eval_pred.label_ids)
    width = min(preds.shape[1], labels.shape[1])
    preds, labels = preds[:, :width], labels[:, :width]
    mask = labels != tc.IGNORE_INDEX
    return {"token_accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}


def eval_dataset(data: Seq2SeqData, seed: int, processor, split: str = "validation", limit: int | None = None):
    splits, _ = load_raw(data, seed)
    ds = splits.train if split == "train" else splits.eval
    return _tokenize(data_mod.limit(ds, limit, seed), processor, data)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, len(processor), (n, 16))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :8].clone()}


# ------------------------------------------------------------------ predict
def generate_texts(model, tokenizer, sources: list[str], max_new_tokens: int = 128,
                   temperature: float | None = None, top_p: float | None = None,
                   max_length: int = 512, batch_size: int = 16, note_option: str | None = None) -> list[str]:
    """Decode the model's output for each (already prefixed) source text.

    Sources are cut to ``max_length`` tokens (and to the model's positions, where it has a limit);
    with ``note_option`` (predict's ``--text``) each cut source is named in a warning.
    """
    positions = tc.text_positions(model)
    if positions is not None:
        if max_new_tokens >= positions and note_option is not None:
            raise UserInputError(f"--max-new-tokens {max_new_tokens}: the model's decoder has {positions} positions; "
                                 f"use at most {positions - 1}")
        max_new_tokens = min(max_new_tokens, positions - 1)  # BLEU's data.max_target_length
        max_length = min(max_length, positions)
    if note_option is not None:
        why = (f"the run reads at most {max_length} (data.max_length)" if positions is None or max_length < positions
               else f"the model has {max_length} positions")
        for i, ids in enumerate(tokenizer(sources)["input_ids"]):
            if len(ids) > max_length:
                tc.note_cut(note_option, i, len(ids), max_length, why, "last")
    kwargs = tc.sampling_kwargs(max_new_tokens, temperature, top_p)
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc = tc.model_inputs(model, enc.to(model_device(model)))  # a BERT tokenizer's token_type_ids: not T5's
        with torch.no_grad():
            ids = model.generate(**enc, **kwargs)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [text.strip() for text in out]


def generate(run, text: str | list[str], max_new_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None) -> str | list[str]:
    """The run's output for ``text`` (the recipe's source prefix is added). Greedy by default, at most
    ``max_new_tokens`` (default 128) new tokens; a source longer than the run reads is cut with a warning."""
    texts = [text] if isinstance(text, str) else list(text)
    prefix = source_prefix(run.recipe.data)
    tc.check_sampling(max_new_tokens, temperature, top_p)
    new = max_new_tokens or DEFAULT_NEW_TOKENS
    positions = tc.text_positions(run.model)
    if max_new_tokens is None and positions is not None:
        new = min(new, positions - 1)
    out = generate_texts(run.model, run.processor, [prefix + t for t in texts], new,
                         temperature, top_p, max_length=run.recipe.data.max_length, note_option="--text")
    return out[0] if isinstance(text, str) else out


def bleu(model, tokenizer, data: Seq2SeqData, rows, max_new_tokens: int | None = None,
         predictions: list[dict[str, str]] | None = None) -> dict[str, float]:
    """sacreBLEU's BLEU and chrF of greedy outputs for raw ``rows`` against their targets;
    ``predictions`` (a list) receives each row's input, reference and prediction."""
    import sacrebleu

    prefix = source_prefix(data)
    sources, refs = zip(*(pairs(row, data) for row in rows)) if len(rows) else ((), ())
    if not sources:
        return {}
    hyps = generate_texts(model, tokenizer, [prefix + s for s in sources],
                          max_new_tokens or data.max_target_length, max_length=data.max_length)
    if predictions is not None:
        predictions += [{"input": s, "reference": r, "prediction": h} for s, r, h in zip(sources, refs, hyps)]
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [list(refs)]).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [list(refs)]).score), "bleu_rows": len(hyps)}


def _raw_rows(data: Seq2SeqData, seed: int, split: str, limit: int | None):
    splits, _ = load_raw(data, seed)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, seed)
    return [ds[i] for i in range(len(ds))]


def generation_metrics(model, processor, data: Seq2SeqData, seed: int, split: str = "validation",
                       limit: int | None = BLEU_ROWS, predictions: list[dict[str, str]] | None = None) -> dict[str, float]:
    """BLEU and chrF of greedy outputs on ``limit`` rows of ``split`` (``train`` runs it once at the end);
    ``predictions`` receives the rows (see :func:`bleu`)."""
    was_training = model.training
    model.eval()
    try:
        return bleu(model, processor, data, _raw_rows(data, seed, split, limit), predictions=predictions)
    finally:
        model.train(was_training)


def evaluate_bleu(run, split: str = "validation", limit: int | None = 100) -> dict[str, float]:
    """BLEU of a loaded run's greedy outputs on ``limit`` rows of ``split``."""
    return generation_metrics(run.model, run.processor, run.recipe.data, run.recipe.seed, split, limit)


def predict(run, inputs: list[str], *, max_new_tokens: int | None = None, temperature: float | None = None,
            top_p: float | None = None, **_) -> list[dict]:
    """``predict --text``: the run's output per text (see :func:`generate`)."""
    return generated_rows(generate, run, inputs, max_new_tokens, temperature, top_p)
