"""Only serve/backend.py touches the rest of loracli (so moving that code touches one file here)."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_cli

SERVE = Path(lora_cli.__file__).resolve().parent / "serve"
ALLOWED = ("lora_cli.serve", "lora_cli.errors")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.startswith("lora_cli")}


def test_only_the_backend_imports_loracli_outside_serve():
    wrong = {path.name: sorted(n for n in imported(path) if not n.startswith(ALLOWED))
             for path in SERVE.glob("*.py") if path.name != "backend.py"}
    assert not {k: v for k, v in wrong.items() if v}
