"""Sequence to sequence (translation, summarisation): source text -> target text, e.g. T5.

Rows are ``data.source_column`` / ``data.target_column`` pairs, or WMT16-style records
``translation: {de: ..., en: ...}`` read with ``data.source_lang`` / ``data.target_lang``.
Sources get ``data.source_prefix`` (default for translation: "translate German to English: ")
and are truncated to ``data.max_length``; targets to ``data.max_target_length``. Labels are
padded with -100; the model derives its decoder inputs from them.

Metrics. The Trainer's evaluation reports eval_loss and teacher-forced token accuracy,
which cost one forward pass. BLEU needs generation, which is slow, so it is computed once
at the end of training on a few validation rows (:func:`final_metrics`, ``eval_bleu`` in
eval.json) and by :func:`evaluate_bleu` for `loracli eval`, not at every evaluation step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.tasks import data as data_mod
from lora_cli.tasks import text_common as tc
from lora_cli.tasks.text_common import load_processor, make_collator  # noqa: F401 - the task interface

logger = logging.getLogger(__name__)

NAME = "seq2seq"
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"
TRANSLATION_COLUMN = "translation"
BLEU_ROWS = 32  # rows generated for the end-of-training BLEU
LANGUAGES = {
    "de": "German", "en": "English", "fr": "French", "ro": "Romanian", "cs": "Czech", "ru": "Russian",
    "fi": "Finnish", "tr": "Turkish", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese",
    "zh": "Chinese", "ja": "Japanese",
}


# ------------------------------------------------------------------------- data
def _mode(recipe) -> str:
    data = recipe.data
    if data.source_column or data.target_column:
        if not (data.source_column and data.target_column):
            raise UserInputError("data.source_column and data.target_column go together: set both")
        return "columns"
    if data.source_lang and data.target_lang:
        return "translation"
    raise UserInputError(
        "data: seq2seq needs data.source_column + data.target_column, or data.source_lang + data.target_lang "
        f"for rows with a {TRANSLATION_COLUMN!r} column of {{lang: text}} records (WMT16 style)"
    )


def source_prefix(recipe) -> str:
    data = recipe.data
    if data.source_prefix is not None:
        return data.source_prefix
    if _mode(recipe) == "translation":
        src = LANGUAGES.get(data.source_lang, data.source_lang)
        tgt = LANGUAGES.get(data.target_lang, data.target_lang)
        return f"translate {src} to {tgt}: "
    return ""


def pairs(row: dict[str, Any], recipe) -> tuple[str, str]:
    data = recipe.data
    if _mode(recipe) == "columns":
        return str(row[data.source_column]), str(row[data.target_column])
    record = row[TRANSLATION_COLUMN]
    missing = [lang for lang in (data.source_lang, data.target_lang) if lang not in record]
    if missing:
        raise UserInputError(
            f"data.source_lang/target_lang: a {TRANSLATION_COLUMN!r} record has no {missing[0]!r} "
            f"(it has {', '.join(record)})"
        )
    return str(record[data.source_lang]), str(record[data.target_lang])


def load_raw(recipe) -> tuple[data_mod.Splits, None]:
    data = recipe.data
    if _mode(recipe) == "columns":
        columns = {"data.source_column": data.source_column, "data.target_column": data.target_column}
    else:
        columns = {"data.source_lang (needs a translation column)": TRANSLATION_COLUMN}
    return tc.load_splits(recipe, columns), None


def build_model(recipe, labels=None, source=None):
    from transformers import AutoModelForSeq2SeqLM

    return tc.build_model(recipe, AutoModelForSeq2SeqLM, source)


def heads(model) -> list[str]:
    return []


def _tokenize(ds, tokenizer, recipe):
    data, prefix = recipe.data, source_prefix(recipe)

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        src, tgt = pairs(row, recipe)
        ids = tokenizer(prefix + src, truncation=True, max_length=data.max_length)["input_ids"]
        labels = tokenizer(text_target=tgt, truncation=True, max_length=data.max_target_length)["input_ids"]
        return {"input_ids": ids, "labels": labels}

    return tc.tokenize_map(ds, encode, desc="tokenizing")


def prepare(splits: data_mod.Splits, processor, recipe):
    return _tokenize(splits.train, processor, recipe), _tokenize(splits.eval, processor, recipe)


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


def eval_dataset(recipe, processor, split: str = "validation", limit: int | None = None):
    splits, _ = load_raw(recipe)
    ds = splits.train if split == "train" else splits.eval
    return _tokenize(data_mod.limit(ds, limit, recipe.seed), processor, recipe)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, len(processor), (n, 16))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :8].clone()}


# ------------------------------------------------------------------ predict
def generate_texts(model, tokenizer, sources: list[str], max_new_tokens: int = 128,
                   temperature: float | None = None, top_p: float | None = None,
                   max_length: int = 512, batch_size: int = 16) -> list[str]:
    """Decode the model's output for each (already prefixed) source text."""
    kwargs = tc.sampling_kwargs(max_new_tokens, temperature, top_p)
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start:start + batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc = enc.to(model_device(model))
        with torch.no_grad():
            ids = model.generate(**enc, **kwargs)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [text.strip() for text in out]


def generate(run, text: str | list[str], max_new_tokens: int = 128,
             temperature: float | None = None, top_p: float | None = None) -> str | list[str]:
    """The run's output for ``text`` (the recipe's source prefix is added). Greedy by default."""
    texts = [text] if isinstance(text, str) else list(text)
    prefix = source_prefix(run.recipe)
    out = generate_texts(run.model, run.processor, [prefix + t for t in texts], max_new_tokens,
                         temperature, top_p, max_length=run.recipe.data.max_length)
    return out[0] if isinstance(text, str) else out


def bleu(model, tokenizer, recipe, rows, max_new_tokens: int | None = None) -> dict[str, float]:
    """sacreBLEU of greedy outputs for raw ``rows`` against their targets."""
    import sacrebleu

    prefix = source_prefix(recipe)
    sources, refs = zip(*(pairs(row, recipe) for row in rows)) if len(rows) else ((), ())
    if not sources:
        return {}
    hyps = generate_texts(model, tokenizer, [prefix + s for s in sources],
                          max_new_tokens or recipe.data.max_target_length, max_length=recipe.data.max_length)
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, [list(refs)]).score), "bleu_rows": len(hyps)}


def _raw_rows(recipe, split: str, limit: int | None):
    splits, _ = load_raw(recipe)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, recipe.seed)
    return [ds[i] for i in range(len(ds))]


def evaluate_bleu(run, split: str = "validation", limit: int | None = 100) -> dict[str, float]:
    """BLEU of the run's greedy outputs on ``limit`` rows of ``split`` (for `loracli eval`)."""
    return bleu(run.model, run.processor, run.recipe, _raw_rows(run.recipe, split, limit))


def final_metrics(model, processor, recipe, eval_ds=None) -> dict[str, float]:
    """Extra end-of-training metrics: BLEU on up to BLEU_ROWS validation rows, prefixed eval_."""
    was_training = model.training
    model.eval()
    try:
        scores = bleu(model, processor, recipe, _raw_rows(recipe, "validation", BLEU_ROWS))
    finally:
        model.train(was_training)
    return {f"eval_{k}": v for k, v in scores.items()}
