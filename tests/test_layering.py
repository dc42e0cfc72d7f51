"""The package map in CONTRIBUTING.md holds: no module imports a layer above
its own, wherever the import sits (top level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_cli

PACKAGE = Path(lora_cli.__file__).resolve().parent

# layer -> the loracli layers it may import (itself always allowed)
MAY_IMPORT = {
    "errors": set(),
    "task_kinds": set(),
    "atomic": {"errors"},  # a failed write is a LoraCliError (CONTRIBUTING: the small helpers may import errors)
    "safe_text": set(),
    "progress": set(),
    "hf_names": {"errors"},
    "hub": {"errors"},
    "devices": {"errors"},
    "rundir": {"errors", "atomic"},
    "packaged": {"errors", "atomic", "safe_text"},
    "adapters": {"errors", "atomic", "hf_names"},  # atomic is a ground-floor helper (it imports errors only)
    "recipe": {"errors", "adapters", "task_kinds"},
    "tasks": {"errors", "safe_text", "progress", "hub", "devices", "adapters", "recipe", "hf_names", "task_kinds", "packaged"},
    "evaluation": {"errors", "atomic", "safe_text", "devices", "rundir", "adapters"},  # the method facts (torch-free)
    "training": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
                 "hf_names", "task_kinds", "packaged"},
    "inference": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
                  "hf_names", "task_kinds", "packaged"},
    "serve": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
              "inference", "hf_names", "task_kinds", "packaged"},
    "cli": {"*"},
    "commands": {"*"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "lora_cli"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lora_cli" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        allowed = MAY_IMPORT[layer]
        for other in _imported_layers(path) - {layer}:
            if "*" not in allowed and other not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE)} imports lora_cli.{other}")
    assert not wrong, "\n".join(wrong)


def test_every_layer_is_in_the_map():
    layers = {_layer(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(MAY_IMPORT), sorted(layers - set(MAY_IMPORT))
