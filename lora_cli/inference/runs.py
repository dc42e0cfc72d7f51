"""The inference verbs on a run directory: what `eval`, `merge` and `predict` do, minus printing.

Each function takes the run directory (the recipe comes from its ``recipe.yaml``, so no
verb can be paired with the wrong recipe), loads the trained model with
:func:`lora_cli.inference.loading.load_run`, and returns data for the CLI to render.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.evaluation import learning
from lora_cli.recipe.shipped import known_rate

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH = 32
SPLITS = ("validation", "train")
"""What ``eval --split`` takes: any other name would silently evaluate the validation data."""


def _eval_batch_size(recipe: Any, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {requested}")
        return requested
    training = getattr(recipe, "training", None) or {}
    value = training.get("per_device_eval_batch_size") if isinstance(training, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_EVAL_BATCH


def _id2label(loaded: Any) -> dict[int, str]:
    from lora_cli.inference.predict import label_map

    labels = loaded.id2label or label_map(loaded.model)
    if not labels:
        raise UserInputError(f"{loaded.run_dir}: the run has no label map (adapter/label_map.json); re-train it")
    return {int(k): str(v) for k, v in labels.items()}


def eval_run(
    run_dir: str | Path,
    split: str = "validation",
    limit: int | None = None,
    adapter_dir: str | Path | None = None,
    base: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    write: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate the run's adapter (or ``adapter_dir``'s, or none with ``base``) on its data.

    Writes ``eval.json`` + ``plots/confusion_matrix.png`` for the run's own adapter on the
    validation split; variants get their own names (``eval_base.json``,
    ``eval_adapter-<dir>.json``, ``eval_train.json``) so they never overwrite it.
    """
    from lora_cli.evaluation.report import evaluate, evaluate_lm, write_report
    from lora_cli.inference.loading import load_run

    if split not in SPLITS:
        raise UserInputError(
            f"--split {split!r}: a run has the splits {', '.join(SPLITS)} (the recipe's training data and the "
            "validation data it trained against); pick one of them"
        )
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {limit}")
    if base and adapter_dir is not None:
        raise UserInputError("--base evaluates without any adapter; drop --adapter or --base")
    holder = rd.RunLock(Path(run_dir)).holder() if write else None
    if holder is not None:  # its final evaluation would race ours for eval.json
        raise UserInputError(f"{run_dir} is being trained right now ({holder}); evaluate it once that run ends")
    if write:  # the confusion matrix goes into plots/: never through a link out of the run
        rd.check_run_links(run_dir, (rd.PLOTS_DIR,))
    loaded = load_run(run_dir, adapter_dir=adapter_dir, device=device)
    recipe, task = loaded.recipe, loaded.task
    dataset = task.eval_dataset(recipe.data, recipe.seed, loaded.processor, split=split, limit=limit)
    size = _eval_batch_size(recipe, batch_size)
    collate = task.make_collator(loaded.processor, recipe.data)
    context = loaded.model.disable_adapter() if base else contextlib.nullcontext()
    with context:
        if loaded.id2label:
            report = evaluate(loaded.model, dataset, collate, _id2label(loaded), size)
        else:  # generative tasks: loss, perplexity (and BLEU where the task has it)
            report = evaluate_lm(loaded.model, dataset, collate, size)
            if task.generation_metrics is not None:
                predictions: list[dict[str, Any]] = []
                report.update(task.generation_metrics(loaded.model, loaded.processor, recipe.data, recipe.seed,
                                                      split=split, limit=limit or 100, predictions=predictions))
                report["generations"] = predictions  # written beside the report: <name>_predictions.jsonl
    report["split"] = split
    report["limit"] = limit
    report["variant"] = "base" if base else ("adapter" if adapter_dir is None else str(adapter_dir))
    if not base and loaded.id2label:
        _warn_if_at_chance(report, recipe)
    if not write:
        return report, {}
    name = "eval"
    if base:
        name += "_base"
    elif adapter_dir is not None:
        name += f"_adapter-{Path(adapter_dir).resolve().name}"
    if split != "validation":
        name += f"_{split}"
    return report, write_report(report, loaded.run_dir, name=name)


def _warn_if_at_chance(report: dict[str, Any], recipe: Any) -> None:
    """The not-learning line of `train` for a finished run whose accuracy is at chance (the best
    constant guess on this split): a warning, and ``not_learning`` in the report."""
    supports = [row["support"] for row in report.get("per_class", [])]
    if "accuracy" not in report or len(supports) < 2 or not sum(supports):
        return
    majority = max(supports) / sum(supports)
    evidence = learning.accuracy_evidence(report["accuracy"], len(supports), majority)
    if evidence is None:
        return
    rate = (recipe.training or {}).get("learning_rate")
    line = learning.not_learning_line(evidence, float(rate) if rate is not None else None,
                                      known_rate(recipe.model.name_or_path, recipe.adapter.method))
    report["not_learning"] = line
    warnings.warn(line, stacklevel=2)


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


def _refuse_unmergeable(adapter_dir: Path) -> None:
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
    from lora_cli.inference.merge import DTYPES, check_out_dir, merge_run

    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    check_out_dir(out_dir, force, run_dir=run_dir)  # fail before the slow model load
    rd.check_run_links(run_dir)
    _refuse_unmergeable(Path(run_dir) / rd.ADAPTER_DIR)
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
    from lora_cli.tasks import chat

    stop = chat.stop_ids(loaded.processor, loaded.processor.chat_template)
    return {"eos_token_id": stop, "pad_token_id": loaded.processor.pad_token_id} if stop else None


def load_merged_text(model_dir: str | Path, device: str | None = None) -> Any:
    """A merged text model (``loracli merge`` output) as a run for ``predict --text / --prompt``: its
    task and prompt settings from ``loracli.json`` (else its architecture), model and tokenizer."""
    from types import SimpleNamespace

    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    from lora_cli.devices import resolve_device
    from lora_cli.inference.loading import LoadedRun
    from lora_cli.inference.predict import label_map
    from lora_cli.recipe import ModelSection
    from lora_cli.recipe.data import data_section_for
    from lora_cli.task_kinds import CAUSAL_LM, SEQ2SEQ, SEQ_CLS
    from lora_cli.tasks import get_task
    from lora_cli.tasks.text_common import load_tokenizer

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
        SEQ_CLS if "SequenceClassification" in architectures
        else SEQ2SEQ if getattr(config, "is_encoder_decoder", False)
        else CAUSAL_LM if ("CausalLM" in architectures or "LMHead" in architectures) else None
    )
    classes = {CAUSAL_LM: AutoModelForCausalLM, SEQ2SEQ: AutoModelForSeq2SeqLM, SEQ_CLS: AutoModelForSequenceClassification}
    if task not in classes:
        raise UserInputError(f"{model_dir} holds a {architectures or 'model'} that is no text model loracli merges "
                             "(causal-lm, seq-cls, seq2seq); image models take image paths instead of --text / --prompt")
    try:
        model = classes[task].from_pretrained(model_dir)
        tokenizer = load_tokenizer(ModelSection(), source=model_dir)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load the model in {model_dir}: {exc}") from None
    data = data_section_for(task).model_construct(**(record.get("data") or {}))
    recipe = SimpleNamespace(task=task, data=data, seed=0, adapter=SimpleNamespace(method="merged"))
    model.to(resolve_device(device)).eval()
    return LoadedRun(model_dir, recipe, model, tokenizer, get_task(task), label_map(model) or None)


def load_predictor(run_dir: str | Path | None = None, model_dir: str | Path | None = None, device: str | None = None):
    """``(model, processor, id2label)`` from a run directory or a merged model directory."""
    if (run_dir is None) == (model_dir is None):
        raise UserInputError("pass exactly one of --run RUN_DIR or --model MERGED_DIR")
    if model_dir is not None:
        from lora_cli.inference.predict import load_merged

        return load_merged(model_dir, device=device)
    from lora_cli.inference.loading import load_run

    loaded = load_run(run_dir, device=device)
    if loaded.task.KIND.inputs != "images":
        raise UserInputError(
            f"{run_dir} is a {loaded.recipe.task} run: give it text with --text (seq-cls, seq2seq) or --prompt "
            "(causal-lm) instead of image paths"
        )
    return loaded.model, loaded.processor, _id2label(loaded)


def predict_text(
    run_dir: str | Path | None,
    texts: list[str],
    top_k: int = 5,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    device: str | None = None,
    scalings: bool = False,
    model_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Text runs (or a merged text model, ``model_dir``): labels (seq-cls) or generated text (causal-lm,
    seq2seq), one row per input; ``scalings`` (X-LoRA runs) adds each row's expert weights, see
    :func:`expert_scalings`."""
    from lora_cli.inference.loading import load_run

    if model_dir is not None:
        if scalings:
            raise UserInputError("--scalings needs the --run of an X-LoRA run; a merged model has no experts")
        loaded = load_merged_text(model_dir, device=device)
        return _text_rows(loaded, model_dir, texts, top_k, max_new_tokens, temperature, top_p)
    loaded = load_run(run_dir, device=device)
    weights = expert_scalings(loaded, texts) if scalings else None  # refused before any generation
    rows = _text_rows(loaded, run_dir, texts, top_k, max_new_tokens, temperature, top_p)
    for row, found in zip(rows, weights or []):
        row["scalings"] = found
    return rows


def expert_scalings(loaded: Any, texts: list[str]) -> list[dict[str, Any]]:
    """X-LoRA runs: per text, each token's weight of each expert (mean over the LoRA layers,
    before global_scaling_weight) and the mean over the tokens."""
    from lora_cli.tasks.text_common import text_positions

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


def _text_rows(loaded: Any, run_dir: str | Path, texts: list[str], top_k: int, max_new_tokens: int | None,
               temperature: float | None, top_p: float | None) -> list[dict[str, Any]]:
    task = loaded.task
    if task.classify_text is not None:
        labels = task.classify_text(loaded, texts, top_k=top_k)
        return [{"text": t, "top_k": row} for t, row in zip(texts, labels)]
    if task.generate is not None:
        kwargs = {"temperature": temperature, "top_p": top_p}
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        outputs = task.generate(loaded, texts, **kwargs)
        return [{"text": t, "generated": g} for t, g in zip(texts, outputs)]
    raise UserInputError(
        f"--text/--prompt are for text runs; {run_dir} is a {task.KIND.name} run: pass image paths instead"
    )
