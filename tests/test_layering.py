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
    "labels": {"errors"},  # a classifier's label map, resolved once (runs, merged models, heads)
    "hf_names": {"errors"},
    "hub": {"errors"},
    "devices": {"errors"},
    "rundir": {"errors", "atomic"},
    "packaged": {"errors", "atomic", "safe_text"},
    "adapters": {"errors", "atomic", "hf_names"},  # atomic is a ground-floor helper (it imports errors only)
    "recipe": {"errors", "adapters", "task_kinds"},
    "tasks": {"errors", "safe_text", "progress", "hub", "devices", "adapters", "recipe", "hf_names", "task_kinds", "packaged",
              "labels"},
    "evaluation": {"errors", "atomic", "safe_text", "devices", "rundir", "adapters"},  # the method facts (torch-free)
    "training": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
                 "hf_names", "task_kinds", "packaged", "labels"},
    "inference": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
                  "hf_names", "task_kinds", "packaged", "labels"},
    "serve": {"errors", "atomic", "safe_text", "progress", "hub", "devices", "rundir", "adapters", "recipe", "tasks", "evaluation",
              "inference", "hf_names", "task_kinds", "packaged", "labels"},
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


def _tasks_modules(path: Path) -> set[str]:
    """The ``lora_cli.tasks`` modules one file imports (``base``, ``causal_lm``, ``data``, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "lora_cli.tasks":
                names += [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["lora_cli", "tasks"] and len(parts) > 2:
                found.add(parts[2])
    return found


def test_task_data_imports_no_task_module():
    """tasks/data/ is what the task modules share: it imports none of them (nor ``tasks.base``,
    which imports it), only its own modules and the quantized-base loader."""
    data = PACKAGE / "tasks" / "data"
    assert (data / "__init__.py").is_file()
    wrong = []
    for path in sorted(data.rglob("*.py")):
        for other in _tasks_modules(path) - {"data", "quantization"}:
            wrong.append(f"{path.relative_to(PACKAGE)} imports lora_cli.tasks.{other}")
    assert not wrong, "\n".join(wrong)


def test_tasks_folder_holds_the_tasks():
    """tasks/ shows its four tasks: the task modules, the interface, the quantized base, and data/."""
    from lora_cli.task_kinds import TASK_KINDS

    modules = {p.stem for p in (PACKAGE / "tasks").glob("*.py")}
    assert modules == {"__init__", "base", "quantization"} | {kind.module for kind in TASK_KINDS.values()}
