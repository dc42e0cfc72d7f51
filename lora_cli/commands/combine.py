"""`loracli combine`: trained LoRA runs combined into a new run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import ok


def combine(
    runs: Annotated[list[Path], typer.Argument(help="Two or more LoRA run directories.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the new run.", show_default=False)],
    weights: Annotated[
        str | None, typer.Option("--weights", help="One weight per run, each between -100 and 100, e.g. 0.7,0.3 "
                                           "(default: equal, summing to 1).")
    ] = None,
    how: Annotated[
        str, typer.Option("--how", help="linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, "
                                        "dare_ties_svd, magnitude_prune or magnitude_prune_svd (PEFT's names).")
    ] = "svd",
    density: Annotated[
        float | None, typer.Option("--density", help="ties / dare / magnitude_prune: fraction of entries kept.")
    ] = None,
    majority_sign: Annotated[
        str, typer.Option("--majority-sign", help="ties kinds: elect signs by 'total' or 'frequency'.")
    ] = "total",
    rank: Annotated[int | None, typer.Option("--rank", help="svd kinds: rank of the result (default: largest).")] = None,
    svd_clamp: Annotated[
        float | None, typer.Option("--svd-clamp", help="svd kinds: clamp factors at this quantile, e.g. 0.99.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if an earlier combine wrote it.")] = False,
) -> None:
    """Combine trained LoRA runs into a new run that eval, merge and predict take like any run.

    Example: loracli combine runs/a runs/b --weights 0.7,0.3 --how ties --density 0.5 --out runs/ab
    """
    from lora_cli.inference.combine import combine_runs, parse_weights

    report = combine_runs(runs, out, weights=parse_weights(weights, len(runs)), how=how, density=density,
                          majority_sign_method=majority_sign, svd_rank=rank, svd_clamp=svd_clamp, overwrite=overwrite)
    ok(report.describe())
