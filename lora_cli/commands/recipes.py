"""`loracli recipes`: list, show and copy the shipped recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lora_cli.commands.output import err, shown
from lora_cli.errors import UserInputError

recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=False)


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
        table.add_row(shown(name), shown(describe(path)))
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
    text, parent = _anchored_extends(source.read_text(encoding="utf-8"), source.parent)
    try:
        with target.open("x", encoding="utf-8") as handle:  # "x": never over a file (or a link) that appeared
            handle.write(text)
    except FileExistsError:
        raise UserInputError(f"{target} already exists; choose another destination or delete it first") from None
    err.print(f"copied {shown(source.name)} to {shown(target)}", highlight=False, soft_wrap=True)
    if parent is not None:
        err.print(f"it extends the shipped {shown(parent)}; to edit what that one sets, copy it too and "
                  "point extends: at your copy", highlight=False, soft_wrap=True)


def _anchored_extends(text: str, folder: Path) -> tuple[str, str | None]:
    """(text, the shipped recipe it extends): a relative ``extends:`` rewritten as a
    ``shipped:`` reference, so that the copy still finds its parent wherever it is written
    (and after loracli is reinstalled elsewhere)."""
    from lora_cli.recipe.shipped import SHIPPED_PREFIX, is_shipped_ref

    match = re.search(r"^extends:[ \t]*(\S[^#\n]*?)[ \t]*(#.*)?$", text, flags=re.MULTILINE)
    if match is None:
        return text, None
    ref = match.group(1).strip("'\"")
    if is_shipped_ref(ref):
        return text, ref[len(SHIPPED_PREFIX):]
    if Path(ref).is_absolute():
        return text, None
    parent = (folder / ref).resolve()
    try:
        inside = parent.relative_to(folder.resolve()).as_posix()
    except ValueError:  # outside the shipped folder: anchor the path itself
        anchored, name = json.dumps(str(parent)), str(parent)
    else:
        anchored, name = json.dumps(SHIPPED_PREFIX + inside), inside
    line = f"extends: {anchored}" + (f"  {match.group(2)}" if match.group(2) else "")
    return text[: match.start()] + line + text[match.end():], name
