"""The ``loracli`` command line: parse, call the library, map errors to exit codes.

Exit codes: 0 success; 1 a failure during the work; 2 bad input (recipe, paths, arguments),
reported as one short message without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from lora_cli import __version__
from lora_cli.errors import LoraCliError, UserInputError

app = typer.Typer(
    name="loracli",
    help="Fine-tune pretrained models with LoRA-family adapters from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")

err = Console(stderr=True)
STATE = {"debug": False}


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
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides a.b.c=value (YAML-typed), e.g. training.learning_rate=1e-3.")
]
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint of the run.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Build the model and data, print what would train, train nothing.")
    ] = False,
) -> None:
    """Fine-tune a model as RECIPE describes; writes a run directory."""
    from lora_cli.training.pipeline import run_training

    run_training(recipe, overrides or [], resume=resume, dry_run=dry_run)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (and overrides) without training."""
    from lora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    err.print(
        f"[green]ok[/green] {escape(str(recipe))}: {loaded.task} / {loaded.adapter.method} / "
        f"{escape(loaded.model_label())} -> {escape(str(loaded.output_path))}",
        highlight=False,
        soft_wrap=True,
    )


@recipes_app.callback(invoke_without_command=True)
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes (show one with `recipes show NAME`, copy with `recipes copy NAME DEST`)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from lora_cli.recipe.shipped import describe, recipes_dir, shipped_recipes

    recipes = shipped_recipes()
    if not recipes:
        raise UserInputError(f"no shipped recipes found in {recipes_dir()}")
    table = Table(title="Shipped recipes", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("description")
    for name, path in recipes.items():
        table.add_row(name, escape(describe(path)))
    Console().print(table)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name, e.g. quickstart.", show_default=False)]) -> None:
    """Print a shipped recipe, comments included."""
    from lora_cli.recipe.shipped import find_shipped

    typer.echo(find_shipped(name).read_text(encoding="utf-8"), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="Recipe name, e.g. quickstart.", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="File (or existing folder) to copy it to.", show_default=False)],
) -> None:
    """Copy a shipped recipe to DEST to edit it; never overwrites."""
    from lora_cli.recipe.shipped import find_shipped

    source = find_shipped(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise UserInputError(f"{target} already exists; choose another destination or delete it first")
    if not target.parent.is_dir():
        raise UserInputError(f"folder {target.parent} does not exist; create it first")
    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    err.print(f"copied {escape(source.name)} to {escape(str(target))}", highlight=False, soft_wrap=True)

def main() -> None:
    """Console-script entry point: run the app, turning errors into exit codes."""
    try:
        app(standalone_mode=False)
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
        exc.show()
        return exc.exit_code
    if STATE["debug"]:
        err.print_exception(show_locals=False)
    if isinstance(exc, UserInputError):
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, LoraCliError):
        err.print(f"[bold red]failed:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    if not STATE["debug"]:
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(str(exc))}\n"
            "(run again with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
    return 1


if __name__ == "__main__":
    main()
