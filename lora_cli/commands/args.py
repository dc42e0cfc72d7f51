"""Arguments several verbs share (a recipe and its overrides, a run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file, or shipped:NAME.yaml (`loracli recipes` lists them).",
                                           show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides a.b.c=value (YAML-typed), e.g. training.learning_rate=1e-3; ~a.b.c removes a key.")
]
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)]
