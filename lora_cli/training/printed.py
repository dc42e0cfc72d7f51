"""What ``loracli train`` prints besides its progress: the dry run's table of adapted modules, the
ranks a calibrated start chose, and the finished run's metrics. User-derived text (module paths,
names, notes) goes through ``safe_text.rich_text``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lora_cli.safe_text import rich_text

console = Console(stderr=True)


def dry_run(recipe, model, n_train: int, n_eval: int, labels, notes: dict[str, str] | None = None) -> None:
    table = Table(title=rich_text(f"{recipe.name}: adapted modules ({recipe.adapter.method})"))
    table.add_column("module")
    table.add_column("layer")
    table.add_column("adapter")
    for path, layer in model.adapter_layers():
        table.add_row(rich_text(path), type(layer.base_layer).__name__, rich_text(layer.extra_repr()))
    for name, encoder in getattr(model, "prompt_encoder", {}).items():  # prompt learning adapts no layer
        table.add_row(rich_text(f"prompt_encoder.{name}"), type(encoder).__name__, rich_text(encoder.extra_repr()))
    console.print(table)
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    config = model.peft_config[model.active_adapter]
    targets = getattr(config, "target_modules", None)
    if targets is not None and not isinstance(targets, str):
        chosen = "the recipe's" if recipe.adapter.options.get("target_modules") is not None else "loracli's default"
        console.print(rich_text(f"target_modules ({chosen}): {', '.join(sorted(targets)) if targets else 'none'}"))
    saved = config.modules_to_save
    console.print(rich_text(f"trained in full (modules_to_save): {', '.join(saved) if saved else 'none'}"))
    label_text = f", {len(labels)} labels" if labels else ""
    for note in (notes or {}).values():
        console.print(rich_text(f"data: {note}"))
    unit = "sequences" if getattr(recipe.data, "packing", False) else "rows"
    console.print(f"data: {n_train} train {unit} / {n_eval} eval rows{label_text}. Dry run: nothing trained, nothing written.")


def calibration(record) -> None:
    table = Table(title=rich_text(f"calibration ({record.init}): {record.batches} batches of {record.batch_size}, "
                               f"seed {record.seed}, {record.seconds:.1f} s"))
    table.add_column("module")
    table.add_column("rank", justify="right")
    table.add_column("alpha", justify="right")
    for path, rank in record.ranks.items():
        table.add_row(rich_text(path), str(rank), f"{record.alphas.get(path, 0):g}")
    console.print(table)


def summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    table = Table(title=rich_text(f"run {run_dir}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(rich_text(key), f"{value:.4f}" if isinstance(value, float) else rich_text(value))
    console.print(table)
