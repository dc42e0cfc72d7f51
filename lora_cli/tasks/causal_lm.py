"""Causal language modelling: next-token prediction on text, prompt + completion pairs, or chat.

text rows -> tokens + EOS -> labels = input_ids
prompt/completion rows -> prompt tokens + completion tokens + EOS; with
data.completion_only_loss the prompt's labels are -100, so only the completion is learnt.
messages / alpaca rows -> the chat template's rendering, the loss on the assistant turns
(:mod:`lora_cli.tasks.data.chat`).

Rows longer than data.max_length follow data.too_long, and no row is left out unseen: each
split's counts are one warning line (and ``train --dry-run`` / ``validate --data`` show them).
``truncate`` cuts a prompt from the left, keeping its leading special tokens (BOS) and the whole
completion; a text or a conversation from the end, keeping the system prompt and the earliest
turns that later ones build on (as TRL and LLaMA-Factory do). A row left with nothing to learn
(its completion alone longer than max_length, no assistant token within it) is left out and
counted. ``drop`` leaves every long row out, ``error`` stops and names them.

With data.packing the training rows are packed into max_length sequences (:mod:`lora_cli.tasks.data.packing`).

The collator right-pads: input_ids with the pad token, labels with -100 (padding never
counts in the loss, even when the pad token is the EOS token, as for GPT-2). Metrics:
eval_loss from the Trainer and eval_perplexity = exp(mean NLL per predicted token).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.recipe import CausalLMData, ModelSection
from lora_cli.task_kinds import CAUSAL_LM, TASK_KINDS
from lora_cli.tasks.base import generated_rows
from lora_cli.tasks.data import chat, packing
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data import text_common as tc
from lora_cli.tasks.data.text_common import load_processor, synthetic_batch  # noqa: F401 - the task interface

logger = logging.getLogger(__name__)

KIND = TASK_KINDS[CAUSAL_LM]
generation_metrics = None
device_inputs = None

KEPT = ("fit", "cut", "prompt_cut")
"""Row fates that train; the others (long, completion_too_long, no_target) are left out."""


# ------------------------------------------------------------------------- data
def load_raw(data: CausalLMData, seed: int) -> tuple[data_mod.Splits, None]:
    check = (lambda ds, source: chat.check_rows(ds, data, source)) if data.chat else None
    return tc.load_splits(data, seed, data.columns(), check_rows=check, row_ids=True), None


def build_model(model: ModelSection, labels=None, source=None):
    from transformers import AutoModelForCausalLM

    return tc.build_model(model, AutoModelForCausalLM, source)


def heads(model) -> list[str]:
    return []


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _leading_specials(ids: list[int], tokenizer) -> int:
    """How many tokens at the start of ``ids`` are special (a BOS a left cut must keep)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    n = 0
    while n < len(ids) - 1 and ids[n] in special:
        n += 1
    return n


def encode(row: dict[str, Any], tokenizer, data: CausalLMData, template: str | None = None) -> dict[str, Any]:
    """One row -> input_ids, labels (-100 where nothing is learnt) and its fate under data.too_long:
    fit, cut (end cut), prompt_cut (prompt cut from the left), long (left out or an error by policy),
    completion_too_long, no_target (nothing left to learn)."""
    limit, truncate = data.max_length, data.too_long == "truncate"
    if data.chat:
        messages = chat.to_messages(row, data)
        ids, labels = chat.encode(messages, tokenizer, template or chat.resolve_template(tokenizer, data), data.train_on)
        return _cut_end(ids, labels, limit, truncate)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data.data_format == "prompt_completion":
        prompt = tokenizer(_text(row[data.prompt_column]))["input_ids"]
        completion = tokenizer(_text(row[data.completion_column]), add_special_tokens=False)["input_ids"] + eos
        fate = "fit"
        if len(prompt) + len(completion) > limit:
            lead = _leading_specials(prompt, tokenizer)
            room = limit - len(completion) - lead
            if not truncate:
                fate = "long"
            elif room < 1:
                fate = "completion_too_long"
            else:
                prompt, fate = prompt[:lead] + prompt[len(prompt) - room:], "prompt_cut"
        ids = prompt + completion
        labels = [tc.IGNORE_INDEX] * len(prompt) + completion if data.completion_only_loss else list(ids)
        return _with_target(ids[:limit], labels[:limit], fate)
    ids = tokenizer(_text(row[data.text_column]))["input_ids"]
    if eos and (not ids or ids[-1] != eos[0]):
        ids = ids + eos
    return _cut_end(ids, list(ids), limit, truncate)


def _cut_end(ids: list[int], labels: list[int], limit: int, truncate: bool) -> dict[str, Any]:
    if len(ids) <= limit:
        return _with_target(ids, labels, "fit")
    return _with_target(ids[:limit], labels[:limit], "cut" if truncate else "long")


def _with_target(ids: list[int], labels: list[int], fate: str) -> dict[str, Any]:
    if fate in KEPT and not any(v != tc.IGNORE_INDEX for v in labels[1:]):
        fate = "no_target"
    return {"input_ids": ids, "labels": labels, "fate": fate}


FATE_TEXT = {
    "cut": "{n} cut at the end",
    "prompt_cut": "{n} with the prompt cut from the left (the completion kept whole)",
    "long": "{n} left out (data.too_long: drop)",
    "completion_too_long": "{n} left out: the completion alone is longer than max_length",
    "no_target": "{n} left out: no token to learn within max_length",
}


def _tokenize(ds, tokenizer, data: CausalLMData, template: str | None, split: str = "training",
              source: str | None = None):
    """Encode every row, apply data.too_long, warn once with the counts; (dataset, note)."""
    row_column = tc.ROW_COLUMN if tc.ROW_COLUMN in ds.column_names else None

    def encode_row(row: dict[str, Any]) -> dict[str, Any]:
        return {**encode(row, tokenizer, data, template), "row": row[row_column] if row_column else -1}

    out = tc.tokenize_map(ds, encode_row, desc="tokenizing")
    fates = out["fate"] if len(out) else []
    counts = Counter(fates)
    where = f"{split} rows" + (f" of {source}" if source and not source.startswith("the ") else "")
    if counts["long"] and data.too_long == "error":
        rows = [r for r, f in zip(out["row"], fates) if f == "long"]
        refs = ", ".join(data_mod.row_ref(source or "", r) for r in rows[:5]) + (
            f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        raise UserInputError(
            f"{data.where('too_long')}: error: {len(rows)} of the {len(fates)} {where} are longer than "
            f"data.max_length={data.max_length} tokens ({refs}); raise data.max_length, shorten those rows, "
            "or set data.too_long: truncate (or drop)"
        )
    kept = [i for i, f in enumerate(fates) if f in KEPT]
    note = f"{len(kept)} of {len(fates)} {where} kept"
    details = [FATE_TEXT[f].format(n=counts[f]) for f in FATE_TEXT if counts[f]]
    if details:
        if data.chat and counts["cut"]:
            details = [d.replace("cut at the end", "cut at the end (later turns lost)") for d in details]
        note += f" (max_length {data.max_length}): " + ", ".join(details)
        logger.warning("data.too_long: %s: %s", data.too_long, note)
    if len(kept) < len(out):
        out = out.select(kept)
    return out.remove_columns(["fate", "row"]), note


def chat_template(processor, data: CausalLMData) -> str | None:
    """The template chat data is rendered with (None for other formats). The tokenizer takes it, so
    the run's saved tokenizer renders ``predict`` prompts as training rendered the rows."""
    if not data.chat:
        return None
    template = chat.resolve_template(processor, data)
    processor.chat_template = template
    if data.train_on == "assistant":
        chat.warn_if_no_stop(processor, template)
    return template


def prepare(splits: data_mod.Splits, processor, data: CausalLMData, seed: int):
    template = chat_template(processor, data)
    train, _ = _tokenize(splits.train, processor, data, template, "training", splits.sources.get("train"))
    eval_ds, _ = _tokenize(splits.eval, processor, data, template, "validation", splits.sources.get("eval"))
    if len(train) == 0:
        raise UserInputError(
            f"data: no training row has a token to learn (data.max_length={data.max_length} "
            "may cut every completion off); raise data.max_length or shorten the prompts"
        )
    if data.packing:
        rows = len(train)
        train = packing.pack(train, data.max_length)
        splits.notes["train"] = f"{rows} training rows packed into {len(train)} sequences of up to {data.max_length} tokens"
        logger.info("data.packing: %d training rows packed into %d sequences", rows, len(train))
    return train, eval_ds


def make_collator(processor, data: CausalLMData | None = None, compact: bool = False):
    """Pads a batch of token-id rows (labels with -100); packed rows keep their position ids and
    get no 2-D attention mask, from which transformers builds the block-diagonal one."""
    return packing.collator(processor.pad_token_id)


# ------------------------------------------------------------------ metrics
def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
    """(batch, seq, vocab) logits -> (batch, 2): summed NLL and count of predicted tokens.

    Keeps evaluation memory at two numbers per row instead of the whole vocabulary.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    extra = logits.shape[1] - labels.shape[1]
    if extra > 0:  # virtual tokens in front (prompt learning): no target there, as in the model's own loss
        labels = torch.nn.functional.pad(labels, (extra, 0), value=tc.IGNORE_INDEX)
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=tc.IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != tc.IGNORE_INDEX
    return torch.stack([(nll * mask).sum(-1), mask.sum(-1).float()], dim=-1)


def compute_metrics(eval_pred) -> dict[str, float]:
    preds = eval_pred.predictions
    if isinstance(preds, tuple):
        preds = preds[0]
    preds = np.asarray(preds)
    if preds.ndim == 3:  # the Trainer handed over raw logits
        preds = preprocess_logits_for_metrics(torch.from_numpy(preds), torch.from_numpy(np.asarray(eval_pred.label_ids))).numpy()
    nll, count = float(preds[:, 0].sum()), float(preds[:, 1].sum())
    mean = nll / max(count, 1.0)
    return {"perplexity": math.exp(min(mean, 700.0)), "token_nll": mean}


def eval_dataset(data: CausalLMData, seed: int, processor, split: str = "validation", limit: int | None = None):
    splits, _ = load_raw(data, seed)
    ds = splits.train if split == "train" else splits.eval
    template = chat_template(processor, data)
    return _tokenize(data_mod.limit(ds, limit, seed), processor, data, template, split,
                     splits.sources.get("train" if split == "train" else "eval"))[0]


# ------------------------------------------------------------------ predict
DEFAULT_NEW_TOKENS = 50


def generate(
    run,
    prompt: str | list[str],
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> str | list[str]:
    """The run's continuation of ``prompt`` (greedy unless temperature/top_p ask for sampling).

    ``run`` is a LoadedRun (:func:`lora_cli.inference.loading.load_run`); returns only the new text, one per prompt.
    The prompt and the new tokens share the model's positions: ``max_new_tokens`` (default 50, fewer on a
    smaller model) must leave one for the prompt, and a prompt too long for the rest is cut from the
    front (the end is what gets continued), with a warning.
    Chat runs (data.format messages / alpaca) answer ``prompt`` as the user's turn, rendered with the
    run's chat template; generation stops at the end-of-sequence token and the template's end of turn.
    """
    tokenizer, model, data = run.processor, run.model, run.recipe.data
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    tc.check_sampling(max_new_tokens, temperature, top_p)
    room = tc.text_positions(model)
    new = max_new_tokens or DEFAULT_NEW_TOKENS
    if room is not None:
        if max_new_tokens is not None and max_new_tokens >= room:
            raise UserInputError(f"--max-new-tokens {max_new_tokens}: the model has {room} positions for the prompt "
                                 f"and the new tokens together; use at most {room - 1}")
        new = min(new, room - 1)
    keep = None if room is None else room - new
    for i, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"]):
        if not ids:
            raise UserInputError(f"--prompt {i + 1} is empty: give the text the model should continue")
    chatting = bool(getattr(data, "chat", False))
    if chatting:
        prompts = [chat.prompt_text(tokenizer, p, data) for p in prompts]
    if keep is not None:
        for i, ids in enumerate(tokenizer(prompts, add_special_tokens=not chatting)["input_ids"]):
            if len(ids) > keep:
                tc.note_cut("--prompt", i, len(ids), keep,
                            f"the model's positions leave room for {keep} beside {new} new tokens", "first")
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # new tokens follow every prompt's end directly
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=keep is not None,
                        max_length=keep, add_special_tokens=not chatting)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    enc = tc.model_inputs(model, enc.to(model_device(model)))
    kwargs = tc.sampling_kwargs(new, temperature, top_p)
    stop = chat.stop_ids(tokenizer, tokenizer.chat_template if chatting else None)
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop or None, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts[0] if isinstance(prompt, str) else texts


def predict(run, inputs: list[str], *, max_new_tokens: int | None = None, temperature: float | None = None,
            top_p: float | None = None, **_) -> list[dict]:
    """``predict --prompt``: the run's continuation per prompt (see :func:`generate`)."""
    return generated_rows(generate, run, inputs, max_new_tokens, temperature, top_p)
