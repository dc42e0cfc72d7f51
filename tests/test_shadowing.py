"""No function body rebinds a name its module imports or defines at the top level.

Such a local makes the name local for the whole function, so the module's helper is out of
reach there: `loracli push` once did ``shown = ", ".join(...)`` and then called ``shown(...)``,
the command's last line, so every successful push ended in "internal error: TypeError", exit
1. ruff's F811 / F823 do not catch it (the local is assigned before the call). Parameters are
left to review: a parameter named like a module helper is visible in the signature."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_cli"


def module_level_names(tree: ast.Module) -> set[str]:
    """Names the module binds at its top level: imports (also under ``if TYPE_CHECKING``), defs, classes, globals."""
    names: set[str] = set()
    for node in tree.body:
        body = node.body if isinstance(node, ast.If) else [node]
        for item in body:
            if isinstance(item, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in item.names)
            elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(item.name)
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def body_bindings(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, int]]:
    """(name, line) of every binding in the function's own scope, parameters and imports excluded
    (a local import of the same name binds the same object)."""
    found, stack = [], list(func.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.name, node.lineno))
            continue  # its body is another scope
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue  # own scopes too
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.append((node.id, node.lineno))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            found.append((node.name, node.lineno))
        stack.extend(ast.iter_child_nodes(node))
    return found


def shadowing(source: str) -> list[str]:
    tree = ast.parse(source)
    top = module_level_names(tree)
    return [f"{func.name}():{line} rebinds {name!r}"
            for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for name, line in body_bindings(func) if name in top]


def test_the_check_finds_the_push_bug():
    source = (
        "from lora_cli.commands.output import shown\n"
        "def push(result):\n"
        "    shown = ', '.join(result)\n"
        "    print(shown(shown))\n"
    )
    assert shadowing(source) == ["push():3 rebinds 'shown'"]
    assert shadowing(source.replace("    shown = ", "    files = ")) == []


def test_no_function_in_the_package_shadows_a_module_name():
    found = [f"{path.relative_to(PACKAGE.parent)}: {hit}"
             for path in sorted(PACKAGE.rglob("*.py")) for hit in shadowing(path.read_text())]
    assert found == [], "\n".join(found)
