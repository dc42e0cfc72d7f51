"""`loracli merge`: fold a run's adapter into its base model, verified (``lora_cli.inference.merge``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.args import RunArg
from lora_cli.commands.output import err, shown


def merge(
    run_dir: RunArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the merged model to.", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    n: Annotated[int, typer.Option("--n", help="How many validation images verify the merge.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if an earlier merge wrote it (merge.json).")] = False,
) -> None:
    """Fold the adapter into the base model, verify the logits, write a plain transformers folder."""
    from lora_cli.inference.merge import merge_from_run

    report = merge_from_run(run_dir, out, dtype=dtype, n=n, force=force)
    note = " [yellow](synthetic inputs: no validation data reachable)[/yellow]" if report.inputs == "synthetic" else ""
    err.print(f"[green]ok[/green] {shown(report.describe())}{note}", highlight=False, soft_wrap=True)
