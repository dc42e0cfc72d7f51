"""The ``loracli`` command line: parse, call the library, map errors to exit codes.

Exit codes: 0 success; 1 a failure during the work; 2 bad input (recipe, paths, arguments),
reported as one short message without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli import __version__
from lora_cli.commands import combine as combine_command
from lora_cli.commands import compare as compare_command
from lora_cli.commands import convert as convert_command
from lora_cli.commands import export as export_command
from lora_cli.commands import push as push_command
from lora_cli.commands import serve as serve_command
from lora_cli.commands import sweep as sweep_command
from lora_cli.commands import tune as tune_command
from lora_cli.commands.output import err, shown
from lora_cli.commands.recipes import recipes_app
from lora_cli.errors import LoraCliError, TrainingInterrupted, UserInputError
from lora_cli.hub import keep_kernel_fetch_offline
from lora_cli.safe_text import terminal_text

app = typer.Typer(
    name="loracli",
    help="Fine-tune pretrained models with LoRA-family adapters from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STATE = {"debug": False}


# Start-up lines third-party packages log on import, not addressed to our users (shown with
# --debug), by logger name and the start of the message:
# - DeepSpeed prints "Setting accelerator to CPU ..." (to stdout, breaking --json) whenever it
#   is imported, and transformers' save_pretrained imports it through accelerate's
#   unwrap_model whenever it is installed, so merge and train would open with it.
# - bitsandbytes (imported by the Trainer through peft, and by quantized runs), on a CPU with
#   AVX512-BF16, asks the `kernels` package for a CPU kernel from the Hub when it is imported:
#   kernels warns that it skips the publisher trust check of
#   `kernels-community/quantization-bitsandbytes` (offline), and bitsandbytes that the kernel
#   failed to load. Its fallback computes the same results, and most runs quantize nothing.
_BANNERS = {
    "DeepSpeed": ("Setting accelerator to", "Setting ds_accelerator to"),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _BannerFilter(logging.Filter):
    """Drops the known banner records of one third-party logger unless --debug.

    A filter on the logger that makes the record (filters of a parent logger do not see its
    children's records), not a level: DeepSpeed resets its logger's level when it is
    imported, but keeps the filters, so this works whenever the package gets imported, and
    its other warnings still reach the user."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return STATE["debug"] or not str(record.msg).lstrip().startswith(self.prefixes)


def _silence_banners() -> None:
    for name, prefixes in _BANNERS.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _BannerFilter) for f in target.filters):
            target.addFilter(_BannerFilter(prefixes))


_silence_banners()
keep_kernel_fetch_offline()  # no network from bitsandbytes' import (lora_cli.hub)


# At exit the interpreter's last garbage collection walks every object still alive: with torch
# and transformers imported that is over half a million, 6-7 s on a busy 2-core machine, which
# every command (and Ctrl-C during `train`) waited through after its work was done. Frozen
# objects are left out of it; the other atexit handlers (trackers, logging) still run, and
# loracli's files are written and closed before the command returns.
atexit.register(gc.freeze)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loracli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    STATE["debug"] = debug
    warnings.showwarning = _show_warning
    if not debug:
        # transformers' per-file "Loading weights" bars are noise around our own progress
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # its load reports ("classifier.weight MISSING") describe the head loracli adds itself
        hf_logging.set_verbosity_error()
        # datasets draws a bar for each internal step ("Flattening the indices", "Casting to class
        # labels"), 0% and 100% frames in a log; loracli shows its real phases itself (lora_cli.progress).
        # Read when datasets is imported; a user's own setting of the variable wins.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["datasets"].disable_progress_bars()
    _log_to_stderr(debug)


def _log_to_stderr(debug: bool) -> None:
    """One stderr handler of ours on the root logger (replacing ours from an earlier call in
    the same process, leaving any other handler, such as pytest's, in place)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_loracli", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._loracli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if debug else _PlainFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


class _PlainFormatter(logging.Formatter):
    """``warning: message`` lines, user data neutralised (the logger's name only with --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {terminal_text(record.getMessage())}"


THIRD_PARTY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning:`` line each; other packages' deprecation notices (nothing a
    loracli user can act on) only with --debug, which also shows where a warning came from."""
    ours = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    if STATE["debug"]:
        err.print(f"[yellow]warning:[/yellow] {shown(str(message))} ({shown(str(filename))}:{lineno}, "
                  f"{category.__name__})", highlight=False, soft_wrap=True)
    elif ours or not issubclass(category, THIRD_PARTY_NOISE):
        err.print(f"[yellow]warning:[/yellow] {shown(str(message))}", highlight=False, soft_wrap=True)


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides a.b.c=value (YAML-typed), e.g. training.learning_rate=1e-3; ~a.b.c removes a key.")
]
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run from its newest checkpoint (not one that completed its steps).")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the model and data, print what would train, train nothing "
                           "(an EVA / CorDA / LoRA-GA start runs its calibration pass and prints the ranks).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run directory of the same name.")
    ] = False,
) -> None:
    """Fine-tune a model as RECIPE describes; writes a run directory.

    Example: loracli train recipes/food101_lora.yaml training.learning_rate=1e-3

    Several GPUs: torchrun --nproc_per_node 4 -m lora_cli train RECIPE (or accelerate launch).

    Sharded models: training.fsdp: true, or training.deepspeed (README, multi-GPU section).
    """
    from lora_cli.training.pipeline import run_training

    try:
        run_training(recipe, overrides or [], resume=resume, dry_run=dry_run, overwrite=overwrite)
    except TrainingInterrupted as exc:  # Ctrl-C once the run directory exists: where it stopped, how to go on
        if str(exc):
            err.print(f"[yellow]{shown(exc)}[/yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(TrainingInterrupted.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted before training started; nothing was written", highlight=False)
        raise typer.Exit(TrainingInterrupted.exit_code) from None


@app.command()
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    data: Annotated[
        bool, typer.Option("--data", help="Also read the data as training would (tokenizer, data.too_long, packing) "
                           "and report the rows each split keeps; the model is not loaded.")
    ] = False,
) -> None:
    """Check a recipe (and overrides) without training."""
    from lora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    if data:
        from lora_cli.training.pipeline import prepare_data

        _, splits, labels, train_ds, eval_ds = prepare_data(loaded)
        for note in splits.notes.values():
            err.print(f"data: {shown(note)}", highlight=False, soft_wrap=True)
        unit = "sequences" if getattr(loaded.data, "packing", False) else "rows"
        label_text = f", {len(labels)} labels" if labels else ""
        err.print(f"data: {len(train_ds)} train {unit} / {len(eval_ds)} eval rows{label_text}", highlight=False)
    err.print(
        f"[green]ok[/green] {shown(recipe)}: {shown(loaded.task)} / {shown(loaded.adapter.method)} / "
        f"{shown(loaded.model_label())} -> {shown(loaded.output_path)}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("eval")
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
    from lora_cli.inference.runs import eval_run

    report, paths = eval_run(run_dir, split=split, limit=limit, adapter_dir=adapter, base=base, batch_size=batch_size)
    if json_out:
        typer.echo(json.dumps(summary(report), indent=2))
    else:
        Console().print(*report_tables(report))
    written = " and ".join(shown(p) for p in paths.values())
    err.print(f"wrote {written}", highlight=False, soft_wrap=True)


@app.command()
def merge(
    run_dir: RunArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the merged model to.", show_default=False)],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = "float32",
    n: Annotated[int, typer.Option("--n", help="How many validation images verify the merge.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if an earlier merge wrote it (merge.json).")] = False,
) -> None:
    """Fold the adapter into the base model, verify the logits, write a plain transformers folder."""
    from lora_cli.inference.runs import merge_from_run

    report = merge_from_run(run_dir, out, dtype=dtype, n=n, force=force)
    note = " [yellow](synthetic inputs: no validation data reachable)[/yellow]" if report.inputs == "synthetic" else ""
    err.print(f"[green]ok[/green] {shown(report.describe())}{note}", highlight=False, soft_wrap=True)


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


@app.command()
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
    import json

    if text or prompt:
        from lora_cli.tasks.text_common import check_sampling

        check_sampling(max_new_tokens, temperature, top_p)  # before the run loads
        if paths or (run is None) == (model is None):
            raise UserInputError("--text/--prompt take a --run RUN_DIR of a text task or a merged --model DIR, "
                                 "and no image paths")
        from lora_cli.inference.runs import predict_text

        rows = predict_text(run, list(text or []) + list(prompt or []), top_k, max_new_tokens, temperature, top_p,
                            scalings=scalings, model_dir=model)
        if json_out:
            typer.echo(json.dumps(rows, indent=2))
        else:
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
        return
    if scalings:
        raise UserInputError("--scalings goes with --prompt / --text of an X-LoRA run (adapter.method: xlora)")
    if not paths:
        raise UserInputError("pass image paths (or --text / --prompt for text runs)")

    from lora_cli.inference.predict import (
        predict_files,
        predictions_json,
        predictions_table,
        write_predictions_csv,
    )
    from lora_cli.inference.runs import load_predictor

    loaded, processor, id2label = load_predictor(run_dir=run, model_dir=model)
    results = predict_files(loaded, processor, paths, id2label, top_k=top_k, batch_size=batch_size)
    if json_out:
        typer.echo(json.dumps(predictions_json(results), indent=2))
    else:
        Console().print(predictions_table(results))
    if csv_file is not None:
        err.print(f"wrote {shown(write_predictions_csv(results, csv_file))}", highlight=False, soft_wrap=True)
    failed = sum(not r.ok for r in results)
    if failed:  # after printing every other file's prediction
        raise LoraCliError(f"{failed} of {len(results)} file(s) could not be predicted (errors above)")


app.add_typer(recipes_app, name="recipes")
app.command("combine")(combine_command.combine)
app.command("convert")(convert_command.convert)
app.command("export")(export_command.export)
app.command("push")(push_command.push)
app.command("tune")(tune_command.tune)
app.command("compare")(compare_command.compare)
app.command("sweep")(sweep_command.sweep)
app.command("serve")(serve_command.serve)


def main() -> None:
    """Console-script entry point: run the app, turning errors into exit codes."""
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit raised inside
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        sys.exit(_report(exc))


def _report(exc: BaseException) -> int:
    # typer vendors click; its usage errors carry show() and exit_code
    if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
        import io

        usage = io.StringIO()  # click echoes the bad argument as typed: neutralise it
        exc.show(file=usage)
        sys.stderr.write(terminal_text(usage.getvalue(), keep_newlines=True))
        sys.stderr.flush()
        return exc.exit_code
    if STATE["debug"]:
        err.print_exception(show_locals=False)
    if isinstance(exc, UserInputError):
        err.print(f"[bold red]error:[/bold red] {shown(exc, keep_newlines=True)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, LoraCliError):
        err.print(f"[bold red]failed:[/bold red] {shown(exc, keep_newlines=True)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    if not STATE["debug"]:
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {shown(exc, keep_newlines=True)}\n"
            "(run again with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
    return 1


if __name__ == "__main__":
    main()
