"""Reading one recipe file: size-checked, parsed by :class:`~lora_cli.recipe.yamlio.RecipeLoader`
(YAML 1.2 core types, hard limits), with the file and line of every key for messages.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lora_cli.recipe.errors import Location, RecipeError, RecipeProblem
from lora_cli.recipe.yamlio import LIMIT_HINT, MAX_FILE_BYTES, LimitError, RecipeLoader

Path_ = tuple  # a key path such as ("adapter", "r")


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
    subject = "the file" if where is None else shown
    too_big = f"{subject} is over {MAX_FILE_BYTES:,} bytes (1 MiB), the limit for a recipe file"
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise fail(f"{subject} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte (1 MiB) limit for a recipe file",
                       LIMIT_HINT)
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
        if len(raw) > MAX_FILE_BYTES:
            raise fail(too_big, LIMIT_HINT)
        text = raw.decode("utf-8")
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
    except LimitError as exc:
        raise fail(f"the recipe {exc.message}", exc.hint, line=exc.line or 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        reason = " ".join(str(exc.problem or exc).split())
        if exc.context:
            context = exc.context
            if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                context += f" (from line {exc.context_mark.line + 1})"
            reason = f"{context}: {reason}"
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise fail(f"{kind}: {reason}", "fix the YAML at this line", line=line) from exc
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
