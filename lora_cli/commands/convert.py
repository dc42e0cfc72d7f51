"""`loracli convert`: a LoHa / LoKr run as plain LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import ok


def convert(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the new run.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Target method (lora).")] = "lora",
    rank: Annotated[int | None, typer.Option("--rank", help="Fixed LoRA rank for every layer.")] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Per layer, the smallest rank keeping this fraction of the energy, e.g. 0.99."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if an earlier convert wrote it.")] = False,
) -> None:
    """Convert a LoHa / LoKr run to plain LoRA (SVD per layer), reporting the error it introduces.

    Example: loracli convert runs/food-loha --to lora --energy 0.99 --out runs/food-lora
    """
    from lora_cli.inference.convert import convert_run

    report = convert_run(run_dir, out, to=to, rank=rank, energy=energy, overwrite=overwrite)
    ok(report.describe())
