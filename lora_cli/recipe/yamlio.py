"""Reading recipe YAML with ``safe_load`` semantics, plus the line of every key.

PyYAML follows YAML 1.1, where ``5e-3`` (no dot) is a string; recipes are full of such
learning rates, so the loader adds YAML 1.2's float form. Line numbers come from the
composed node tree, so every problem can point at the line that caused it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lora_cli.recipe.errors import Location, RecipeError, RecipeProblem

Path_ = tuple  # a key path such as ("adapter", "r")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E+2`` as floats."""


# add_implicit_resolver appends to lists shared with SafeLoader; copy them first.
RecipeLoader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One YAML scalar or flow value (``1e-3`` -> 0.001, ``[a, b]`` -> list, ``""`` -> None)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


class _Dumper(yaml.SafeDumper):
    """Block mappings; short lists of scalars on one line (``[query, value]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump(data: Any) -> str:
    """YAML text that :class:`RecipeLoader` reads back to equal data."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)


def read_recipe_file(path: Path, shown: str, where: Location | None = None) -> tuple[dict, dict]:
    """Parse one recipe file: its mapping and ``{key path: Location}`` for every key.

    ``shown`` is the file name used in messages; ``where`` is the place that referred to
    this file (an ``extends:`` line), used when the file itself cannot be read.
    """
    def fail(message: str, hint: str | None = None, line: int | None = None) -> RecipeError:
        loc = where if where is not None and line is None else Location(shown, line)
        key = "extends" if where is not None and line is None else ""
        return RecipeError(
            [RecipeProblem(key, message, str(path) if key else None, hint, where=loc, has_value=bool(key))],
            source=shown,
        )

    if not path.exists():
        if where is not None:
            raise fail(f"recipe file {shown} not found", f"extends paths are relative to the recipe's folder: {path}")
        raise fail(f"recipe file {shown} not found", "check the path; `loracli recipes` lists the shipped recipes")
    if not path.is_file():
        raise fail(f"{shown} is not a file", "give the path of a .yaml recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {shown} ({exc})") from exc

    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise fail("the recipe is empty", "a recipe is a mapping with name, task, model, data, adapter, training", line=1)
        if not isinstance(node, yaml.MappingNode):
            raise fail(
                f"the top level must be a mapping of sections, not a {_kind(node)}",
                "start with lines such as `name: my-run` and `task: image-classification`",
                line=node.start_mark.line + 1,
            )
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = " ".join(str(exc.problem or exc).split())
        if exc.context:
            context = exc.context
            if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                context += f" (from line {exc.context_mark.line + 1})"
            reason = f"{context}: {reason}"
        raise fail(f"YAML syntax error: {reason}", "fix the YAML at this line", line=line) from exc
    except yaml.YAMLError as exc:
        raise fail(f"YAML error: {exc}", line=1) from exc
    finally:
        loader.dispose()

    locations: dict[Path_, Location] = {(): Location(shown, 1)}
    problems: list[RecipeProblem] = []
    _walk(node, (), shown, locations, problems)
    if problems:
        raise RecipeError(problems, source=shown)
    return data, locations


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "scalar value"


def _walk(node: yaml.Node, path: Path_, shown: str, locations: dict, problems: list) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set = set()
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        dotted = ".".join(map(str, (*path, key)))
        if key_node.tag != "tag:yaml.org,2002:str":
            problems.append(
                RecipeProblem(dotted, "keys must be strings", key, "quote the key", where=Location(shown, line))
            )
            continue
        if key in seen:
            problems.append(
                RecipeProblem(
                    dotted, "is given twice in the same mapping", key, "keep one of them",
                    where=Location(shown, line), has_value=False,
                )
            )
        seen.add(key)
        locations[(*path, key)] = Location(shown, line)
        _walk(value_node, (*path, key), shown, locations, problems)
