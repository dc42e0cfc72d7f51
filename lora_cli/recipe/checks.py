"""Rules between keys and sections that a single field's type cannot state.

Exactly one model and one data source, data paths that exist, keys that fit the task,
sharding files that exist, and settings of two sections that cannot go together. Each
adds to the loader's :class:`~lora_cli.recipe.errors.Reporter`, so every problem is
reported at once with its file and line.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lora_cli.adapters import get_method
from lora_cli.adapters.methods.lora.starts import rewrites_base
from lora_cli.errors import UserInputError, did_you_mean
from lora_cli.recipe.data import DATA_PATHS, DATA_SOURCES, is_template_text
from lora_cli.recipe.errors import Reporter
from lora_cli.recipe.schema import PROCESSOR_KEYS
from lora_cli.recipe.shipped import SHIPPED_PREFIX, data_path, is_shipped_ref, recipes_dir
from lora_cli.task_kinds import IMAGE_CLASSIFICATION, TASK_KINDS, TASKS, TEXT_TASKS, TIMING_METRICS


def check_model(model: Any, task: Any, report: Reporter) -> None:
    if not isinstance(model, dict):
        return
    given = [k for k in ("name_or_path", "config") if model.get(k) is not None]
    if len(given) != 1:
        report.add(
            ("model",),
            "needs exactly one of name_or_path or config" + (" (both are set)" if given else ""),
            hint="name_or_path for a pretrained model, config for a random-init model built offline",
        )
    config = model.get("config")
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            report.add(("model", "config"), "needs a model_type key", hint="e.g. `model_type: vit`", value=model_type)
        else:
            from lora_cli.recipe import transformers_table  # lazily, as in recipe.training

            known = transformers_table.model_types()
            if model_type not in known:
                report.add(
                    ("model", "config", "model_type"), "is not a transformers model type", model_type,
                    did_you_mean(model_type, known) or "e.g. vit, bert, gpt2, t5",
                )
    processor = model.get("processor")
    if processor and task in TEXT_TASKS:
        report.add(("model", "processor"), f"is for image models; task {task} uses a tokenizer", processor,
                   "remove it, or set model.tokenizer")
    elif isinstance(processor, dict):
        for key in processor:
            if key not in PROCESSOR_KEYS:
                hint = did_you_mean(str(key), list(PROCESSOR_KEYS)) or f"the keys are {', '.join(PROCESSOR_KEYS)}"
                report.add(("model", "processor", key), "is not an image setting", hint=hint)
    check_quantization(model.get("quantization"), report)
    check_gguf_file(model, task, report)


def check_gguf_file(model: dict, task: Any, report: Reporter) -> None:
    """model.gguf_file: a text task's pretrained base (a folder or hub repo, not pypi: or config), the file there."""
    gguf = model.get("gguf_file")
    if not isinstance(gguf, str) or not gguf.lower().endswith(".gguf"):
        return  # absent, or the schema reports it
    name = model.get("name_or_path")
    if task == IMAGE_CLASSIFICATION:
        report.add(("model", "gguf_file"), "is for text models (transformers reads GGUF language models only)", gguf,
                   "remove it")
    elif not isinstance(name, str):
        report.add(("model", "gguf_file"), "needs model.name_or_path: the folder or hub repo that holds the file",
                   gguf, "set model.name_or_path (and remove model.config)")
    elif name.startswith("pypi:"):
        report.add(("model", "gguf_file"), f"does not go with {name}: a packaged model is converted to a folder "
                   "already", gguf, "remove model.gguf_file")
    elif model.get("quantization") is not None:
        report.add(("model", "gguf_file"), "does not go with model.quantization: a GGUF base loads dequantised to "
                   "float weights, not through bitsandbytes", gguf, "remove one of them")
    elif Path(name).expanduser().is_dir() and not (Path(name).expanduser() / gguf).is_file():
        report.add(("model", "gguf_file"), f"is not in {name}", gguf,
                   f"looked for {Path(name).expanduser().absolute() / gguf}; name a .gguf file inside that folder")


def check_quantization(quantization: Any, report: Reporter) -> None:
    """model.quantization: bitsandbytes is installed and this machine can run its layers (a CUDA
    GPU, or a release with a CPU backend); one problem, before any model is loaded."""
    if not isinstance(quantization, dict) or quantization.get("bits") not in (4, 8):
        return  # absent, or its own keys are wrong: the schema reports those
    from lora_cli.adapters.quantized import backend_refusal

    refusal = backend_refusal(quantization["bits"])
    if refusal is not None:
        report.add(("model", "quantization"), refusal[0], hint=refusal[1])


def check_data(data: Any, task: Any, report: Reporter) -> None:
    if not isinstance(data, dict):
        return
    given = [k for k in DATA_SOURCES if data.get(k) is not None]
    if len(given) != 1:
        report.add(
            ("data",),
            "needs exactly one data source" + (f" (set: {', '.join(given)})" if given else ""),
            hint="set one of dataset (hub id), imagefolder, train_file or builtin",
        )
    if data.get("validation_file") is not None and data.get("train_file") is None:
        report.add(("data", "validation_file"), "needs data.train_file too", data["validation_file"])
    if task not in TASKS:
        task = None
    if data.get("builtin") is not None and task not in (None, IMAGE_CLASSIFICATION):
        report.add(("data", "builtin"), "'digits' is an image dataset; it needs task image-classification",
                   data["builtin"])
    if data.get("imagefolder") is not None and task not in (None, IMAGE_CLASSIFICATION):
        report.add(("data", "imagefolder"), "needs task image-classification", data["imagefolder"])
    for key in DATA_PATHS:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue
        try:
            path = data_path(value)
        except ValueError:
            continue  # a shipped: path outside the shipped folder: the loader reports it
        where = f"looked for {path}; " + (f"{SHIPPED_PREFIX} paths are inside {recipes_dir()}" if is_shipped_ref(value)
                                          else "paths are relative to the current directory")
        if key == "imagefolder":
            if not path.is_dir():
                report.add(("data", key), "folder not found", value,
                           f"{where}; it needs train/ (and validation/) sub-folders")
            elif not (path / "train").is_dir():
                report.add(("data", key), "has no train/ sub-folder", value,
                           "lay it out as train/<class>/*.jpg and validation/<class>/*.jpg")
        elif not path.is_file():
            report.add(("data", key), "file not found", value, where)
        elif path.suffix.lower() not in (".csv", ".tsv", ".json", ".jsonl"):
            report.add(("data", key), "must be a .csv, .tsv, .json or .jsonl file", value)
    template = data.get("chat_template")
    if isinstance(template, str) and not is_template_text(template):
        try:
            path = data_path(template) if template.strip() else None
        except ValueError:
            return  # a shipped: path outside the shipped folder: the loader reports it
        if path is None or not path.is_file():
            looked = "" if path is None else f"looked for {path}; "
            report.add(("data", "chat_template"), "is neither a Jinja template nor a template file", template,
                       f"{looked}give the template inline (it contains {{% or {{{{) or the path of a .jinja "
                       f"file, relative to the current directory ({SHIPPED_PREFIX}<path>: inside {recipes_dir()})")


def check_sharding(training: Any, report: Reporter) -> None:
    """training.deepspeed / training.fsdp_config given as files: they exist, and DeepSpeed is installed."""
    if not isinstance(training, dict):
        return
    for key in ("deepspeed", "fsdp_config"):
        value = training.get(key)
        if not isinstance(value, str) or not value or value.lstrip().startswith("{"):
            continue  # a mapping in the recipe, or inline JSON
        path = Path(value).expanduser().absolute()
        if not path.is_file():
            report.add(("training", key), "file not found", value,
                       f"looked for {path}; paths are relative to the current directory (or give the settings as a mapping)")
    if training.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        report.add(("training", "deepspeed"), "needs the deepspeed package, which is not installed",
                   training["deepspeed"], "pip install 'loracli[deepspeed]' (or remove training.deepspeed)")


def check_adapter_with_model(adapter: Any, model: Any, task: Any, report: Reporter) -> None:
    """The method fits the task's models, and a quantized base (checked on the raw section, so
    these problems come with the section's own)."""
    if not isinstance(adapter, dict) or not isinstance(adapter.get("method"), str):
        return
    try:
        config_cls = get_method(adapter["method"]).config_cls
    except UserInputError:
        return  # the section's check reports an unknown method
    name = config_cls.method
    kind = TASK_KINDS.get(task) if isinstance(task, str) else None
    if kind is not None and config_cls.task_types is not None and kind.peft_task_type not in config_cls.task_types:
        fits = [name for name, k in TASK_KINDS.items() if k.peft_task_type in config_cls.task_types]
        report.add(("adapter", "method"), f"does not work with task {task}: {name} is for {', '.join(fits)}",
                   adapter["method"], "use method lora for this task, or change the task")
    quantization = model.get("quantization") if isinstance(model, dict) else None
    if not quantization:
        return
    if not config_cls.on_quantized_base:
        report.add(("adapter", "method"), f"{name} does not run on a quantized base (model.quantization)",
                   adapter["method"], "use method lora (QLoRA), or remove model.quantization")
    init = adapter.get("init_lora_weights")
    if rewrites_base(init):
        report.add(("adapter", "init_lora_weights"), "rewrites the base weights, which model.quantization quantizes",
                   init, "use true, gaussian or orthogonal with a quantized base (loftq quantizes a full-precision base itself)")


def check_adapter_with_training(adapter: tuple[str, dict] | None, training: Any, report: Reporter) -> None:
    """Settings of two sections that cannot go together."""
    if adapter is None or not isinstance(training, dict):
        return
    config_cls = get_method(adapter[0]).config_cls
    if config_cls.shard_refusal is None:
        return
    for key in ("fsdp", "deepspeed"):
        if training.get(key):
            report.add(
                ("training", key),
                f"cannot shard adapter.method {adapter[0]}: {config_cls.shard_refusal}",
                training[key],
                f"train {config_cls.title()} with plain DDP (remove training.fsdp / training.deepspeed) or pick method lora",
            )


def check_metric_for_best_model(training: Any, task: Any, report: Reporter) -> None:
    """``training.metric_for_best_model`` must name a metric the task's evaluations report during
    training (the Trainer would fail at the first evaluation, after the steps before it)."""
    kind = TASK_KINDS.get(task) if isinstance(task, str) else None
    value = training.get("metric_for_best_model") if isinstance(training, dict) else None
    if kind is None or not isinstance(value, str):
        return
    name = value.removeprefix("eval_")
    if name in (*kind.metrics, *TIMING_METRICS):
        if name in LOWER_IS_BETTER and training.get("greater_is_better") is None:
            report.add(("training", "metric_for_best_model"), "is better when lower, but the Trainer takes any "
                       "metric not named *loss as higher-is-better, so it would keep the worst checkpoint", value,
                       "add greater_is_better: false")
        return
    hint = did_you_mean(value.removeprefix("eval_"), kind.metrics)
    report.add(("training", "metric_for_best_model"), f"is not an evaluation metric of {article(kind.name)} run", value,
               f"its evaluations report {', '.join(kind.metrics)}" + (f"; {hint}" if hint else ""))


LOWER_IS_BETTER = ("perplexity", "token_nll", "runtime")
"""Metrics (besides the loss, which the Trainer knows) where lower is better."""


def article(word: str) -> str:
    """``an image-classification`` / ``a seq2seq``."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
