"""Causal language modelling: next-token prediction on text, or on prompt + completion pairs.

text rows -> tokens (truncated to data.max_length) + EOS -> labels = input_ids
prompt/completion rows -> prompt tokens + completion tokens + EOS; with
data.completion_only_loss the prompt's labels are -100, so only the completion is learnt.

The collator right-pads: input_ids with the pad token, labels with -100 (padding never
counts in the loss, even when the pad token is the EOS token, as for GPT-2). Metrics:
eval_loss from the Trainer and eval_perplexity = exp(mean NLL per predicted token).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.recipe import CausalLMData, ModelSection
from lora_cli.task_kinds import CAUSAL_LM, TASK_KINDS
from lora_cli.tasks import data as data_mod
from lora_cli.tasks import text_common as tc
from lora_cli.tasks.text_common import load_processor, make_collator, synthetic_batch  # noqa: F401 - the task interface

KIND = TASK_KINDS[CAUSAL_LM]
generation_metrics = None
device_inputs = None
classify_text = None


# ------------------------------------------------------------------------- data
def load_raw(data: CausalLMData, seed: int) -> tuple[data_mod.Splits, None]:
    return tc.load_splits(data, seed, data.columns()), None


def build_model(model: ModelSection, labels=None, source=None):
    from transformers import AutoModelForCausalLM

    return tc.build_model(model, AutoModelForCausalLM, source)


def heads(model) -> list[str]:
    return []


def encode(row: dict[str, Any], tokenizer, data: CausalLMData) -> dict[str, list[int]]:
    """One row -> input_ids and labels (-100 on the prompt with completion_only_loss)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if data.prompt_column:
        prompt = tokenizer(str(row[data.prompt_column]))["input_ids"]
        completion = tokenizer(str(row[data.completion_column]), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt + completion)[: data.max_length]
        if data.completion_only_loss:
            labels = ([tc.IGNORE_INDEX] * len(prompt) + completion)[: data.max_length]
        else:
            labels = list(ids)
        return {"input_ids": ids, "labels": labels}
    ids = tokenizer(str(row[data.text_column]), truncation=True, max_length=data.max_length)["input_ids"]
    if eos and len(ids) < data.max_length and (not ids or ids[-1] != eos[0]):
        ids = ids + eos
    return {"input_ids": ids, "labels": list(ids)}


def _tokenize(ds, tokenizer, data: CausalLMData):
    out = tc.tokenize_map(ds, lambda row: encode(row, tokenizer, data), desc="tokenizing")
    return out.filter(lambda row: any(v != tc.IGNORE_INDEX for v in row["labels"][1:]), desc="dropping rows with no target")


def prepare(splits: data_mod.Splits, processor, data: CausalLMData, seed: int):
    train, eval_ds = _tokenize(splits.train, processor, data), _tokenize(splits.eval, processor, data)
    if len(train) == 0:
        raise UserInputError(
            f"data: no training row has a token to learn (data.max_length={data.max_length} "
            "may cut every completion off); raise data.max_length or shorten the prompts"
        )
    return train, eval_ds


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
    return _tokenize(data_mod.limit(ds, limit, seed), processor, data)


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
    """
    tokenizer, model = run.processor, run.model
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
    for i, ids in enumerate(tokenizer(prompts)["input_ids"]):
        if not ids:
            raise UserInputError(f"--prompt {i + 1} is empty: give the text the model should continue")
        if keep is not None and len(ids) > keep:
            tc.note_cut("--prompt", i, len(ids), keep,
                        f"the model's positions leave room for {keep} beside {new} new tokens", "first")
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # new tokens follow every prompt's end directly
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=keep is not None,
                        max_length=keep).to(model_device(model))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    kwargs = tc.sampling_kwargs(new, temperature, top_p)
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts[0] if isinstance(prompt, str) else texts
