"""`loracli convert`: a LoHa / LoKr run as plain LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import err, ok, shown


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
    _say_the_size(report, run_dir, out)


def _say_the_size(report, run_dir: Path, out: Path) -> None:
    """The source's rank and adapter file size against the LoRA's: a LoHa or LoKr update has a
    higher rank than its ``r`` (up to r² and rank(w1)·rank(w2)), so the LoRA that keeps it can be
    several times larger; the user should hear that, and how to trade size for error."""
    import json
    import warnings

    from lora_cli import rundir as rd
    from lora_cli.evaluation.compare import format_bytes

    weights = Path(rd.ADAPTER_DIR) / "adapter_model.safetensors"
    before, after = (run_dir / weights).stat().st_size, (out / weights).stat().st_size
    source = json.loads((run_dir / rd.ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = sorted({layer.rank for layer in report.conversion.layers})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    err.print(f"adapter: {shown(report.method)} r={shown(source.get('r'))}, {format_bytes(before)} -> lora rank {span}, "
              f"{format_bytes(after)}", highlight=False, soft_wrap=True)
    if after > before:
        warnings.warn(f"the LoRA adapter is larger than the {report.method} one ({format_bytes(after)}, "
                      f"{after / before:.1f}x {format_bytes(before)}): keeping the update took rank {span}. A fixed "
                      "--rank or a lower --energy makes it smaller, at a larger error (convert.json lists each "
                      "layer's rank and error)", stacklevel=1)
