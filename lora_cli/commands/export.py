"""`loracli export`: a run as a verified ONNX model, or as GGUF for llama.cpp (adapter or merged model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import err, shown


def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx, or gguf (llama.cpp).")] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write (default: RUN-onnx or RUN-gguf beside the run).", show_default=False)
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many validation inputs verify the merge (and the ONNX export).")] = 16,
    exporter: Annotated[
        str, typer.Option("--exporter", help="auto (dynamo, then TorchScript if it fails), dynamo or torchscript.")
    ] = "auto",
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="gguf: write the merged model (model.gguf) instead of the LoRA adapter.")
    ] = False,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="gguf: float32 (default) or float16 for the tensors written.",
                                 show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Export a run: a verified ONNX model, or GGUF for llama.cpp; writes nothing if a check fails.

    --format onnx (image and text classifiers): merge (verified), export, check ONNX Runtime against PyTorch. The folder holds model.onnx, config.json (labels), the processor or tokenizer, and export.json.

    --format gguf (causal LMs on a Llama-architecture base): adapter.gguf, the LoRA adapter in llama.cpp's format, for the base model's own GGUF (llama-cli -m BASE.gguf --lora adapter.gguf); with --merged, model.gguf, the merged model with its tokenizer and chat template. Plus export.json.

    Examples: loracli export runs/quickstart --format onnx --out quickstart-onnx/ ; loracli export runs/smol-chat --format gguf --out smol-gguf/
    """
    from lora_cli.inference.export import export_run

    report = export_run(run_dir, out, fmt=fmt, n=n, force=force, exporter=exporter, opset=opset, merged=merged,
                        dtype=dtype)
    note = " [yellow](synthetic inputs: no validation data reachable)[/yellow]" if report.inputs == "synthetic" else ""
    err.print(f"[green]ok[/green] {shown(report.describe())}{note}", highlight=False, soft_wrap=True)
