"""``loracli compare RUN...``: one table of method, size, effective rank, metric, time, memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli.atomic import writing
from lora_cli.errors import UserInputError
from lora_cli.safe_text import rich_text

PLOT_NAME = "compare.png"

RunsArg = Annotated[list[Path], typer.Argument(help="Run directories written by `loracli train`.", show_default=False)]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help=f"Where to write the overlaid loss / eval curves (default: {PLOT_NAME} in the "
                                "runs' common parent folder, with the table only; --md, --csv and --json write "
                                "a figure only with --plot).", show_default=False),
]


def compare(
    runs: RunsArg,
    md: Annotated[bool, typer.Option("--md", help="Print a Markdown table.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (text cells spreadsheet-safe).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    plot: PlotOpt = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no figure.")] = False,
) -> None:
    """Compare finished runs: method, rank/alpha, trainable parameters, adapter size, effective rank,
    eval metric, training time, throughput, peak memory; plus an overlaid PNG of the curves.

    Example: loracli compare runs/quickstart runs/quickstart-loha --md
    """
    write_comparison(runs, md=md, csv_out=csv_out, json_out=json_out, plot=plot, no_plot=no_plot)


def write_comparison(runs: list[Path], md: bool = False, csv_out: bool = False, json_out: bool = False,
                     plot: Path | None = None, no_plot: bool = False, title: str = "Run comparison") -> None:
    """Print the comparison of ``runs`` in the chosen format and write the figure (sweep reuses it)."""
    import json

    from lora_cli import rundir as rd
    from lora_cli.evaluation.compare import compare_runs, csv_text, markdown_table, rich_table
    from lora_cli.evaluation.compare_plot import is_compare_figure, plot_comparison

    if md + csv_out + json_out > 1:
        raise UserInputError("pass at most one of --md, --csv and --json")
    if plot is not None and no_plot:
        raise UserInputError("--plot FILE writes the figure and --no-plot skips it; pass only one of them")
    rows = compare_runs(runs)
    # the figure: when --plot asks for it, or beside the table of the default mode; the data
    # formats (--md, --csv, --json) are often redirected and never rewrite a figure unasked
    target = plot if plot is not None else None if no_plot or md or csv_out or json_out else default_plot_path(runs)
    if target is not None:  # the folder rule, for a file: checked before anything is printed or written
        rd.check_output_file(target, rd.Output("--plot", "compare", None, str(target.with_name("compare-2.png"))),
                             ours=is_compare_figure, reads=runs)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    elif md:
        typer.echo(markdown_table(rows), nl=False)
    elif csv_out:
        typer.echo(csv_text(rows), nl=False)
    else:
        console = Console()
        if not console.is_terminal:  # piped: rich's 80 columns would squeeze the table
            console = Console(width=200)
        console.print(rich_table(rows, title=title))
    if target is None:
        return
    with writing(target):  # a full disk or read-only folder: one line; the figure is whole or absent
        written = plot_comparison(runs, [r["run"] for r in rows], target)
    err = Console(stderr=True)
    if written is None:
        err.print("no curves in the runs' metrics.jsonl; no figure written", highlight=False)
    else:
        err.print(f"wrote {rich_text(written)}", highlight=False, soft_wrap=True)


def default_plot_path(runs: list[Path]) -> Path:
    """compare.png in the folder that holds all the runs (runs/ for runs/a and runs/b)."""
    parents = [str(Path(r).absolute().parent) for r in runs]
    return Path(os.path.commonpath(parents)) / PLOT_NAME
