"""`loracli validate`: check a recipe (and overrides) without training; ``--data`` also reads the data."""

from __future__ import annotations

from typing import Annotated

import typer

from lora_cli.commands.args import OverridesArg, RecipeArg
from lora_cli.commands.output import err, shown


def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    data: Annotated[
        bool, typer.Option("--data", help="Also read the data as training would (tokenizer, data.too_long, packing) "
                           "and report the rows each split keeps; the model is not loaded.")
    ] = False,
) -> None:
    """Check a recipe (and overrides) without training."""
    from lora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    if data:
        from lora_cli.training.pipeline import prepare_data

        _, splits, labels, train_ds, eval_ds = prepare_data(loaded)
        for note in splits.notes.values():
            err.print(f"data: {shown(note)}", highlight=False, soft_wrap=True)
        unit = "sequences" if getattr(loaded.data, "packing", False) else "rows"
        label_text = f", {len(labels)} labels" if labels else ""
        err.print(f"data: {len(train_ds)} train {unit} / {len(eval_ds)} eval rows{label_text}", highlight=False)
    err.print(
        f"[green]ok[/green] {shown(recipe)}: {shown(loaded.task)} / {shown(loaded.adapter.method)} / "
        f"{shown(loaded.model_label())} -> {shown(loaded.output_path)}",
        highlight=False,
        soft_wrap=True,
    )
