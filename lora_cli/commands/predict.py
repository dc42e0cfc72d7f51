"""`loracli predict`: a run's or merged model's answers for images, texts or prompts (``lora_cli.inference.predict``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli.commands.output import err, shown
from lora_cli.errors import LoraCliError, UserInputError


def _scalings_table(scalings: dict):
    """One row per prompt token, one column per X-LoRA expert: its weight (mean over the LoRA layers)."""
    from rich.table import Table

    table = Table(title="X-LoRA expert weights per token (mean over the LoRA layers)")
    table.add_column("token")
    for name in scalings["experts"]:
        table.add_column(f"expert {shown(name)}", justify="right")
    for token, weights in zip(scalings["tokens"], scalings["per_token"], strict=True):
        table.add_row(shown(token), *(f"{w:.3f}" for w in weights))
    table.add_row("[bold]mean[/bold]", *(f"{scalings['mean'][n]:.3f}" for n in scalings["experts"]))
    return table


def predict(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Image files, folders or quoted globs.", show_default=False)
    ] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Run directory written by `loracli train`.")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Merged model folder written by `loracli merge`.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to show per image.")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    csv_file: Annotated[Path | None, typer.Option("--csv", help="Also write the predictions to this CSV file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 16,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="Text runs: classify (seq-cls) or translate (seq2seq) this text.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Causal-LM runs: continue this prompt.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", help="Generation length, 1 to 8192 (default 50 causal-lm, 128 seq2seq). The prompt "
        "and the new tokens share the model's positions: a prompt too long for the rest is cut from the front, "
        "with a warning.")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Sample with this temperature, a finite number >= 0 "
                                                         "(default: greedy).")
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling threshold, in (0, 1].")] = None,
    scalings: Annotated[
        bool, typer.Option("--scalings", help="X-LoRA runs: also show each expert's weight per prompt token.")
    ] = False,
) -> None:
    """Classify images (or, for text runs, --text / --prompt) with a trained run or a merged model.

    Exit code 1 if any file failed. Examples: loracli predict beignets.jpg --run runs/food101-lora;
    loracli predict --run runs/opt-lora --prompt "The weather today"
    """

    texts = list(text or []) + list(prompt or [])
    if texts:
        from lora_cli.tasks.data.text_common import check_sampling

        check_sampling(max_new_tokens, temperature, top_p)  # before the run loads
        if paths or (run is None) == (model is None):
            raise UserInputError("--text/--prompt take a --run RUN_DIR of a text task or a merged --model DIR, "
                                 "and no image paths")
    elif scalings:
        raise UserInputError("--scalings goes with --prompt / --text of an X-LoRA run (adapter.method: xlora)")
    elif not paths:
        raise UserInputError("pass image paths (or --text / --prompt for text runs)")

    from lora_cli.inference.predict import load_for_predict
    from lora_cli.inference.predict import predict as predict_inputs

    loaded = load_for_predict(run_dir=run, model_dir=model, texts=bool(texts), scalings=scalings)
    rows = predict_inputs(loaded, texts or list(paths or []), scalings=scalings, top_k=top_k, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if texts:
        _print_text_rows(rows, json_out)
    else:
        _print_file_rows(rows, json_out, csv_file)


def _print_text_rows(rows: list[dict], json_out: bool) -> None:
    import json

    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if "generated" in row:  # possibly empty: the model ended at once
            answer = row["generated"]
        else:
            answer = ", ".join(f"{r['label']}: {r['score']:.3f}" for r in row["top_k"])
        # generated text keeps its line breaks; escapes and bidi overrides are shown, not obeyed
        line = f"[bold]{shown(row['text'], keep_newlines=True)}[/bold] -> {shown(answer, keep_newlines=True)}"
        Console().print(line, soft_wrap=True)
        if "scalings" in row:
            Console().print(_scalings_table(row["scalings"]))


def _print_file_rows(results: list, json_out: bool, csv_file: Path | None) -> None:
    import json

    from lora_cli.inference.predict import (
        predictions_json,
        predictions_table,
        write_predictions_csv,
    )

    if json_out:
        typer.echo(json.dumps(predictions_json(results), indent=2))
    else:
        Console().print(predictions_table(results))
    if csv_file is not None:
        err.print(f"wrote {shown(write_predictions_csv(results, csv_file))}", highlight=False, soft_wrap=True)
    failed = sum(not r.ok for r in results)
    if failed:  # after printing every other file's prediction
        raise LoraCliError(f"{failed} of {len(results)} file(s) could not be predicted (errors above)")
