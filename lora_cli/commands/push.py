"""`loracli push`: publish a run on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.commands.output import ok


def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `loracli train`.", show_default=False)],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. me/food101-lora.", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    merged: Annotated[
        bool, typer.Option("--merged", help="Upload the verified merged model instead of the adapter.")
    ] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to upload to (created if missing).", show_default=False)
    ] = None,
    dry_run: Annotated[
        Path | None,
        typer.Option("--dry-run", help="Write the exact folder that would be uploaded to DIR; nothing remote.",
                     show_default=False),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Hub id for the card's base_model when the recipe names a local path.",
                     show_default=False),
    ] = None,
) -> None:
    """Upload a run to the Hub: the adapter in PEFT's layout (or --merged), processor, recipe, plots and a model card.

    Needs a Hugging Face token (`hf auth login` or HF_TOKEN); offline it fails at once and sends nothing.

    Example: loracli push runs/food101-lora me/food101-lora --private   (or --dry-run to-push/ to look first)
    """
    from lora_cli.inference.push import push_run

    result = push_run(run_dir, repo_id, private=private, merged=merged, revision=revision, dry_run=dry_run,
                      base_model=base_model)
    files = ", ".join(result["files"][:8]) + (" ..." if len(result["files"]) > 8 else "")
    if dry_run is not None:
        ok(f"dry run: wrote {len(result['files'])} file(s) to {result['dry_run']} ({files}); nothing uploaded")
    else:
        ok(f"pushed {len(result['files'])} file(s) to {result['url']}")
