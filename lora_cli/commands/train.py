"""`loracli train`: fine-tune a model as a recipe describes (``lora_cli.training.pipeline``)."""

from __future__ import annotations

from typing import Annotated

import typer

from lora_cli.commands.args import OverridesArg, RecipeArg
from lora_cli.commands.output import err, shown
from lora_cli.errors import TrainingInterrupted, UserInputError


def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run from its newest checkpoint (not one that completed its steps).")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the model and data, print what would train, train nothing "
                           "(an EVA / CorDA / LoRA-GA start runs its calibration pass and prints the ranks).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run directory of the same name.")
    ] = False,
) -> None:
    """Fine-tune a model as RECIPE describes; writes a run directory.

    Example: loracli train recipes/food101_lora.yaml training.learning_rate=1e-3

    Several GPUs: torchrun --nproc_per_node 4 -m lora_cli train RECIPE (or accelerate launch).

    Sharded models: training.fsdp: true, or training.deepspeed (README, multi-GPU section).
    """
    from lora_cli.recipe import load_recipe

    if resume and overwrite:
        raise UserInputError("--resume continues the run and --overwrite replaces it; pass only one of them")
    try:
        loaded = load_recipe(recipe, overrides or [])  # bad input reported before torch is imported
        from lora_cli.training.pipeline import run_training

        run_training(recipe, overrides or [], resume=resume, dry_run=dry_run, overwrite=overwrite, loaded=loaded)
    except TrainingInterrupted as exc:  # Ctrl-C once the run directory exists: where it stopped, how to go on
        if str(exc):
            err.print(f"[yellow]{shown(exc)}[/yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(TrainingInterrupted.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted before training started; nothing was written", highlight=False)
        raise typer.Exit(TrainingInterrupted.exit_code) from None
