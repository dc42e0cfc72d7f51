"""`loracli export`: a run as a verified ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import err, shown


def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (default: RUN-onnx beside the run).", show_default=False)
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many validation inputs verify the merge and the export.")] = 16,
    exporter: Annotated[
        str, typer.Option("--exporter", help="auto (dynamo, then TorchScript if it fails), dynamo or torchscript.")
    ] = "auto",
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Merge the adapter (verified), export to ONNX, check ONNX Runtime against PyTorch; writes nothing if they differ.

    Image classifiers and text classifiers (seq-cls). The folder holds model.onnx, config.json (labels), the processor or tokenizer, and export.json (exporter, tolerance, differences).

    Example: loracli export runs/quickstart --format onnx --out quickstart-onnx/
    """
    from lora_cli.inference.export import export_run

    report = export_run(run_dir, out, fmt=fmt, n=n, force=force, exporter=exporter, opset=opset)
    note = " [yellow](synthetic inputs: no validation data reachable)[/yellow]" if report.inputs == "synthetic" else ""
    err.print(f"[green]ok[/green] {shown(report.describe())}{note}", highlight=False, soft_wrap=True)
