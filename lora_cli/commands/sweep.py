"""``loracli sweep RECIPE AXIS...``: train a grid of points as separate runs, then compare them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli.atomic import writing
from lora_cli.commands.args import RecipeArg
from lora_cli.commands.compare import PLOT_NAME, write_comparison
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.safe_text import rich_text, terminal_text

err = Console(stderr=True)




def sweep(
    recipe: RecipeArg,
    axes: Annotated[
        list[str], typer.Argument(help="Axes key=v1,v2,... (and fixed overrides key=value).", show_default=False)
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Sweep folder (default: runs/<name>-sweep).", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the points and their checks; train nothing.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Retrain points whose run exists (default: keep completed ones).")
    ] = False,
    md: Annotated[bool, typer.Option("--md", help="End with a Markdown table.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="End with CSV.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="End with JSON rows.")] = False,
) -> None:
    """Train every point of a grid as its own run directory under the sweep folder, then print
    the `loracli compare` table of them and write compare.png there.

    A point whose values make an invalid recipe is reported with its recipe error and skipped;
    the others still train, and the exit code is 1 when any point failed. Completed points are
    kept when the sweep runs again (--overwrite retrains them).

    Example: loracli sweep recipes/quickstart.yaml adapter.method=lora,loha,lokr,adalora adapter.r=8,16
    """
    # the recipe layer imports torch: not at `loracli --help`
    from lora_cli.training.sweep import holding, sweep_folder

    if md + csv_out + json_out > 1:
        raise UserInputError("pass at most one of --md, --csv and --json")
    folder = sweep_folder(recipe, list(axes), out)
    # a full disk or a read-only folder: one line; completed points and sweep.json stay whole
    with writing(folder, kept=" (completed points are kept)"), holding(folder, dry_run):  # one sweep at a time
        _sweep(recipe, list(axes), folder, dry_run, overwrite, md, csv_out, json_out)


def _sweep(recipe: Path, axes: list[str], folder: Path, dry_run: bool, overwrite: bool, md: bool, csv_out: bool,
           json_out: bool) -> None:
    from lora_cli.training.sweep import SWEEP_FILE, plan

    sweep_dir, points = plan(recipe, axes, folder)
    err.print(f"sweep {rich_text(sweep_dir)}: {len(points)} point(s)", highlight=False, soft_wrap=True)
    for point in points:
        settings = ", ".join(f"{k}={v}" for k, v in point.values.items())
        err.print(f"  {rich_text(point.name)}: {rich_text(settings)}", highlight=False, soft_wrap=True)
        for note in point.notes:
            err.print(f"      {rich_text(note)}", highlight=False, soft_wrap=True)
        if point.recipe != recipe:
            err.print(f"      recipe {rich_text(point.recipe)}", highlight=False, soft_wrap=True)
        if point.error:
            shown = rich_text(point.error, keep_newlines=True).replace("\n", "\n      ")
            err.print(f"      [red]invalid:[/red] {shown}", highlight=False, soft_wrap=True)
    if dry_run:
        return
    results = _run_points(sweep_dir, points, overwrite)
    finished = [p.run_dir for p in points if results[p.name]["state"] in ("completed", "kept")]
    if finished:
        write_comparison(finished, md=md, csv_out=csv_out, json_out=json_out, plot=sweep_dir / PLOT_NAME,
                         title=f"Sweep {terminal_text(sweep_dir)}")
    failed = {name: r for name, r in results.items() if r["state"] not in ("completed", "kept")}
    if failed:
        shown = "; ".join(f"{name}: {r['reason']}" for name, r in failed.items())
        raise LoraCliError(f"{len(failed)} of {len(points)} sweep point(s) failed ({terminal_text(shown)}); see "
                           f"{sweep_dir / SWEEP_FILE}. Fix them and run the same sweep again: completed points are kept")


def _run_points(sweep_dir: Path, points, overwrite: bool) -> dict[str, dict]:
    """Train each valid point in its own `loracli train` process (its own peak memory)."""
    from lora_cli import rundir as rd
    from lora_cli.training.sweep import SWEEP_FILE, claim_sweep_dir, is_done

    claim_sweep_dir(sweep_dir)
    results: dict[str, dict] = {}
    for i, point in enumerate(points, 1):
        entry = {"values": point.values, "run_dir": str(point.run_dir), "overrides": point.overrides,
                 "notes": point.notes}
        if point.error:
            entry |= {"state": "invalid", "reason": "invalid recipe (see above)", "error": point.error}
        elif not overwrite and is_done(point):
            err.print(f"[{i}/{len(points)}] {rich_text(point.name)}: completed earlier, kept", highlight=False)
            entry |= {"state": "kept"}
        else:
            err.print(f"[{i}/{len(points)}] [bold]{rich_text(point.name)}[/bold]", highlight=False)
            command = [sys.executable, "-m", "lora_cli", "train", str(point.recipe), *point.overrides]
            if overwrite and rd.is_run_dir(point.run_dir):
                command.append("--overwrite")
            start = time.perf_counter()
            code = subprocess.run(command, check=False).returncode
            entry |= {"state": "completed" if code == 0 else "failed", "exit_code": code,
                      "seconds": round(time.perf_counter() - start, 1)}
            if code:
                entry["reason"] = f"`loracli train` exited with {code} (its message is above)"
        results[point.name] = entry
        rd.write_json(sweep_dir / SWEEP_FILE, {"points": results})
    return results
