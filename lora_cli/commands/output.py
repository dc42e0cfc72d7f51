"""What every command prints through: stderr for messages, user text neutralised."""

from __future__ import annotations

from rich.console import Console

from lora_cli.safe_text import rich_text

err = Console(stderr=True)
"""Messages (ok / wrote / warnings) go to stderr, so stdout stays the command's data (--json)."""


shown = rich_text
"""User-derived text for rich: control characters / bidi overrides shown escaped, markup escaped."""


def ok(message: object, note: str = "") -> None:
    """``ok <message>`` on stderr; ``note`` is rich markup of loracli's own."""
    err.print(f"[green]ok[/green] {shown(message)}{note}", highlight=False, soft_wrap=True)
