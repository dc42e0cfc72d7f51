"""`loracli eval`: score a run on its recipe's data (``lora_cli.inference.evaluate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli.commands.args import RunArg
from lora_cli.commands.output import err, shown


def eval_command(
    run_dir: RunArg,
    split: Annotated[str, typer.Option("--split", help="validation or train.")] = "validation",
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate a seeded random subset of N examples.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report (without per-sample rows) as JSON.")] = False,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Evaluate this PEFT-format adapter (a folder, or a hub id user/repo) instead of the run's.")
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the base model, adapter disabled.")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Default: the recipe's eval batch size.")] = None,
) -> None:
    """Evaluate a run on its recipe's data; writes eval.json and plots/confusion_matrix.png."""
    import json

    from lora_cli.evaluation.report import report_tables, summary
    from lora_cli.inference.evaluate import eval_run

    report, paths = eval_run(run_dir, split=split, limit=limit, adapter_dir=adapter, base=base, batch_size=batch_size)
    if json_out:
        typer.echo(json.dumps(summary(report), indent=2))
    else:
        Console().print(*report_tables(report))
    written = " and ".join(shown(p) for p in paths.values())
    err.print(f"wrote {written}", highlight=False, soft_wrap=True)
