"""The ``training`` section: ``transformers.TrainingArguments`` fields, type-checked.

The mapping is not turned into ``TrainingArguments`` here: that would probe devices (and
refuse fp16 on a CPU-only machine that only validates). Each value is checked against the
field's annotation instead, plus the few rules that would otherwise fail minutes later.
"""

from __future__ import annotations

import enum
import math
import types
import typing
from typing import Any

from lora_cli.errors import did_you_mean
from lora_cli.recipe.errors import Reporter, is_bool_word

# Keys loracli sets itself, and what to do instead.
CONTROLLED = {
    "output_dir": "loracli sets it; use the top-level output_dir",
    "logging_dir": "TensorBoard logs go to <run>/logs/tensorboard; set TENSORBOARD_LOGGING_DIR to put them elsewhere",
    "remove_unused_columns": "loracli sets it automatically for the task",
    "label_names": "loracli sets it automatically for the task",
    "seed": "use the top-level seed",
    "resume_from_checkpoint": "use `loracli train --resume`",
    "disable_tqdm": "loracli sets it; it shows its own progress",
}

# (minimum, inclusive?) for numeric fields where a wrong sign fails late or silently.
BOUNDS = {
    "learning_rate": (0, False),
    "num_train_epochs": (0, False),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "weight_decay": (0, True),
    "warmup_steps": (0, True),
    "logging_steps": (0, False),
    "max_grad_norm": (0, True),
}


# The strings a field typed ``bool | str`` takes, where one of them is a YAML 1.1 boolean word.
BOOL_OR_STR_CHOICES = {"include_num_input_tokens_seen": ("all", "non_padding", "no")}


def takes_bool(annotation: Any) -> bool:
    """Is ``bool`` one of the types ``annotation`` allows (``bool``, ``bool | str | None``, ...)?"""
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(takes_bool(a) for a in typing.get_args(annotation))
    return False


def training_fields() -> dict[str, Any]:
    """{field name: annotation} of TrainingArguments (settable ones)."""
    from lora_cli.recipe import (
        transformers_table,  # not at the top: `python -m` runs it as a script
    )

    fields = transformers_table.training_arguments()[0]
    return {name: ANNOTATION_FIXES.get(name, hint) for name, hint in fields.items()}


# Fields whose annotation is narrower than what TrainingArguments takes: `fsdp: true` turns
# FSDP on (the form transformers recommends), the older strings and lists still work.
ANNOTATION_FIXES: dict[str, Any] = {"fsdp": bool | str | list[str] | None}


def training_defaults() -> dict[str, Any]:
    """{field name: default} of TrainingArguments (enum defaults as their values)."""
    from lora_cli.recipe import transformers_table

    return dict(transformers_table.training_arguments()[1])


def optimizer_steps(training: dict[str, Any], n_train: int, world_size: int = 1) -> int:
    """The optimizer steps the Trainer takes over ``n_train`` rows, by its own rule.

    ``training`` is the recipe's section; fields it leaves out take TrainingArguments'
    defaults. Fractional epochs count as the Trainer counts them. (AdaLoRA's schedule
    spans exactly these steps.)
    """
    settings = training_defaults() | dict(training)
    if settings["max_steps"] and settings["max_steps"] > 0:
        return int(settings["max_steps"])
    batch = settings["per_device_train_batch_size"] * max(world_size, 1)
    batches = n_train // batch if settings["dataloader_drop_last"] else math.ceil(n_train / batch)
    accumulate = settings["gradient_accumulation_steps"]
    per_epoch = max(batches // accumulate + int(batches % accumulate > 0), 1)
    return math.ceil(settings["num_train_epochs"] * per_epoch)


def _enum_values(cls: type[enum.Enum]) -> list[str]:
    return [str(m.value) for m in cls]


def check_value(value: Any, annotation: Any) -> tuple[bool, str]:
    """Does ``value`` (from YAML) fit ``annotation``? Returns (ok, what was expected)."""
    if annotation is Any:
        return True, "anything"
    if annotation is type(None) or annotation is None:
        return value is None, "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            choices = [v for e in enums for v in _enum_values(e)]
            return value in choices, "one of " + ", ".join(repr(c) for c in choices)
        results = [check_value(value, a) for a in args]
        return any(ok for ok, _ in results), " or ".join(dict.fromkeys(e for _, e in results))
    if origin is typing.Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
        return ok, "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = _enum_values(annotation)
        return value in choices, "one of " + ", ".join(repr(c) for c in choices)
    if annotation is bool:
        return isinstance(value, bool), "true or false"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if annotation is str:
        return isinstance(value, str), "a string"
    if annotation is list or origin is list:
        if not isinstance(value, list):
            return False, "a list"
        if args:
            return all(check_value(v, args[0])[0] for v in value), f"a list of {check_value(None, args[0])[1]}"
        return True, "a list"
    if annotation is dict or origin is dict:
        return isinstance(value, dict), "a mapping"
    if isinstance(annotation, type):
        return isinstance(value, annotation), f"a {annotation.__name__} (not settable from a recipe)"
    return True, "anything"


def check_training(raw: Any, report: Reporter) -> dict[str, Any] | None:
    """Validate the training mapping; returns it (a plain dict) or None."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        report.add(("training",), "must be a mapping of TrainingArguments fields", raw, "e.g. `learning_rate: 5e-3`")
        return None
    fields = training_fields()
    before = len(report.problems)
    for key, value in raw.items():
        path = ("training", key)
        if key in CONTROLLED:
            report.add(path, "cannot be set in training", value, CONTROLLED[key])
            continue
        if key == "report_to":
            check_report_to(value, report)
            continue
        if key not in fields:
            hint = did_you_mean(key, fields) or "see transformers.TrainingArguments for the field names"
            report.add(path, "is not a TrainingArguments field", value, hint)
            continue
        ok, expected = check_value(value, fields[key])
        if not ok:
            hint = None
            if isinstance(value, str) and expected.startswith("one of"):
                hint = did_you_mean(value, [c.strip("'") for c in expected[7:].split(", ")])
            report.add(path, f"must be {expected}", value, hint)
            continue
        if is_bool_word(value) and takes_bool(fields[key]) and value not in BOOL_OR_STR_CHOICES.get(key, ()):
            # a `bool | str` field would take 'off' as a (truthy) string
            choices = BOOL_OR_STR_CHOICES.get(key)
            extra = f" or one of {', '.join(repr(c) for c in choices)}" if choices else ""
            report.add(path, f"must be true or false{extra}", value)
            continue
        if key in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, inclusive = BOUNDS[key]
            if value < low or (value == low and not inclusive):
                report.add(path, f"must be {'>=' if inclusive else '>'} {low}", value)
    if len(report.problems) == before:
        _check_best_model(raw, report)
    return dict(raw) if len(report.problems) == before else None


TRACKERS = {
    # name in report_to: (modules any of which makes it usable, what to install)
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'loracli[track]' (or pip install tensorboard)"),
    "mlflow": (("mlflow",), "pip install 'loracli[track]' (or pip install mlflow)"),
    "wandb": (("wandb",), "pip install wandb"),
    "trackio": (("trackio",), "pip install trackio"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "clearml": (("clearml",), "pip install clearml"),
    "neptune": (("neptune",), "pip install neptune"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
}
"""The experiment trackers ``training.report_to`` passes on to the Trainer (README, tracking)."""


def report_to_names(value: Any) -> list[str]:
    """``training.report_to`` as a list of tracker names (``none`` / missing: empty)."""
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n != "none"]


def check_report_to(value: Any, report: Reporter) -> None:
    """``report_to``: one tracker name, ``none``, or a list of names, each a known tracker."""
    path = ("training", "report_to")
    choices = [*TRACKERS, "none"]
    if value is None:
        return
    if not (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
        report.add(path, "must be a tracker name or a list of them", value, "e.g. `report_to: tensorboard` or "
                   "`report_to: [tensorboard, mlflow]`; one of " + ", ".join(choices))
        return
    for name in [value] if isinstance(value, str) else value:
        if name == "all":
            report.add(path, "cannot be 'all'", value, "name the trackers to use, e.g. [tensorboard, mlflow]: 'all' "
                       "would report to whatever happens to be installed")
        elif name not in choices:
            report.add(path, f"names an unknown tracker {name!r}", value,
                       did_you_mean(name, choices) or "use one of " + ", ".join(choices))


def missing_trackers(value: Any) -> list[tuple[str, str]]:
    """(tracker, install hint) for each tracker in ``report_to`` whose package is not installed."""
    import importlib.util

    missing = []
    for name in report_to_names(value):
        modules, hint = TRACKERS.get(name, ((name,), f"pip install {name}"))
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            missing.append((name, hint))
    return missing


def _check_best_model(raw: dict, report: Reporter) -> None:
    if not raw.get("load_best_model_at_end"):
        return
    defaults = training_defaults()
    eval_s = _text(raw.get("eval_strategy", defaults.get("eval_strategy", "no")))
    save_s = _text(raw.get("save_strategy", defaults.get("save_strategy", "steps")))
    if save_s == "best":
        return
    if eval_s != save_s:
        report.add(
            ("training", "load_best_model_at_end"),
            f"needs save_strategy to match eval_strategy (they are {save_s!r} and {eval_s!r})",
            True,
            "set both to 'epoch' (or both to 'steps')",
        )
    elif eval_s == "steps":  # the Trainer's rule, checked here instead of after the model and data load
        logging = raw.get("logging_steps", defaults.get("logging_steps"))
        eval_steps = raw.get("eval_steps") or logging
        save_steps = raw.get("save_steps", defaults.get("save_steps"))
        whole = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 and float(v).is_integer()
                    for v in (eval_steps, save_steps))
        if whole and int(save_steps) % int(eval_steps):
            where = "eval_steps" if raw.get("eval_steps") else "logging_steps, which eval_steps defaults to"
            report.add(("training", "save_steps"),
                       f"must be a multiple of eval_steps ({int(eval_steps)}) with load_best_model_at_end",
                       save_steps, f"the best checkpoint is chosen at evaluations ({where}); e.g. save_steps: "
                       f"{int(eval_steps) * max(1, round(save_steps / eval_steps))}")


def _text(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)
