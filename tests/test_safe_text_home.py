"""User text for a rich console is escaped by one helper, ``safe_text.rich_text``."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_cli
from lora_cli.commands.output import shown
from lora_cli.safe_text import rich_text

PACKAGE = Path(lora_cli.__file__).resolve().parent


def test_rich_text_escapes_controls_bidi_and_markup():
    assert rich_text("[red]a\x1b[2Jb\u202e") == "\\[red]a\\x1b[2Jb\\u202e"  # [2J is no markup tag
    assert rich_text("a\nb") == "a\\x0ab"
    assert rich_text("a\nb", keep_newlines=True) == "a\nb"
    assert shown is rich_text


def test_no_other_module_escapes_rich_markup_itself():
    """Every other module calls rich_text (or commands.output.shown): no copy of the escaping."""
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "safe_text.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.markup":
                copies.append(str(path.relative_to(PACKAGE)))
    assert not copies, copies
