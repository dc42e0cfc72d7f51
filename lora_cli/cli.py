"""The ``loracli`` app: the verbs registered (one module each in ``lora_cli.commands``), the global
options, and the one place errors become exit codes.

Exit codes: 0 success; 1 a failure during the work; 2 bad input (recipe, paths, arguments),
reported as one short message without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import warnings
from typing import Annotated

import typer

from lora_cli import __version__
from lora_cli.commands import combine as combine_command
from lora_cli.commands import compare as compare_command
from lora_cli.commands import convert as convert_command
from lora_cli.commands import eval as eval_command
from lora_cli.commands import export as export_command
from lora_cli.commands import logs
from lora_cli.commands import merge as merge_command
from lora_cli.commands import predict as predict_command
from lora_cli.commands import push as push_command
from lora_cli.commands import serve as serve_command
from lora_cli.commands import sweep as sweep_command
from lora_cli.commands import train as train_command
from lora_cli.commands import tune as tune_command
from lora_cli.commands import validate as validate_command
from lora_cli.commands.logs import STATE
from lora_cli.commands.output import err, shown
from lora_cli.commands.recipes import recipes_app
from lora_cli.errors import LoraCliError, UserInputError
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



# At exit the interpreter's last garbage collection walks every object still alive: with torch
# and transformers imported that is over half a million, 6-7 s on a busy 2-core machine, which
# every command (and Ctrl-C during `train`) waited through after its work was done. Frozen
# objects are left out of it; the other atexit handlers (trackers, logging) still run, and
# loracli's files are written and closed before the command returns.
atexit.register(gc.freeze)

logs.silence_banners()
keep_kernel_fetch_offline()  # no network from bitsandbytes' import (lora_cli.hub)


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
    warnings.showwarning = logs.show_warning
    if not debug:
        # transformers' settings wait for transformers' own import: validating a recipe needs none
        logs.after_import("transformers.utils.logging", logs.quiet_transformers)
        # datasets draws a bar for each internal step ("Flattening the indices", "Casting to class
        # labels"), 0% and 100% frames in a log; loracli shows its real phases itself (lora_cli.progress).
        # Read when datasets is imported; a user's own setting of the variable wins.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["datasets"].disable_progress_bars()
    logs.log_to_stderr(debug)


app.command("train")(train_command.train)
app.command("validate")(validate_command.validate)
app.command("eval")(eval_command.eval_command)
app.command("merge")(merge_command.merge)
app.command("predict")(predict_command.predict)
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
