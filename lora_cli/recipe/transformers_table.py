"""What a recipe check needs from transformers, without importing it (it imports torch).

Checking a recipe needs ``TrainingArguments``' fields (name, annotation, default) and the
model types transformers knows (``model.config.model_type``). Reading them from transformers
costs seconds of imports (torch, and whatever transformers pulls in) before ``loracli
validate`` can say "did you mean learning_rate?". So they are kept as a table,
``transformers_facts.py``, written from the installed transformers by

    python -m lora_cli.recipe.transformers_table

and used only while the installed transformers is the version it was written from
(``importlib.metadata`` reads the version without importing the package); any other version
falls back to reading the class itself, so a table gone stale costs time, never a wrong
answer. ``tests/recipe/test_transformers_table.py`` fails when the table and the installed
transformers differ.

Annotations are stored as small JSON-like specs (``"int"``, ``["union", [...]]``,
``["enum", "IntervalStrategy", ["no", "steps", "epoch"]]``) and turned back into typing
objects that ``recipe.training.check_value`` reads as it reads the real ones.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import pprint
import types
import typing
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("transformers_facts.py")

_PLAIN = {bool: "bool", int: "int", float: "float", str: "str"}


def encode(annotation: Any) -> Any:
    """A field annotation as a spec of plain values (see the module docstring)."""
    if annotation is Any:
        return "any"
    if annotation is None or annotation is type(None):
        return "none"
    if annotation in _PLAIN:
        return _PLAIN[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return ["union", [encode(a) for a in args]]
    if origin is typing.Literal:
        return ["literal", list(args)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ["enum", annotation.__name__, [str(m.value) for m in annotation]]
    if annotation is list or origin is list:
        return ["list", encode(args[0]) if args else None]
    if annotation is dict or origin is dict:
        return "dict"
    if isinstance(annotation, type):
        return ["type", annotation.__name__]
    return "any"


@functools.cache
def _enum(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(name, [(f"m{i}", v) for i, v in enumerate(values)])


def decode(spec: Any) -> Any:
    """The typing object a spec stands for (enums and other classes as stand-ins of the same name)."""
    if isinstance(spec, str):
        return {"any": Any, "none": type(None), "dict": dict, **{v: k for k, v in _PLAIN.items()}}[spec]
    kind = spec[0]
    if kind == "union":
        return typing.Union[tuple(decode(s) for s in spec[1])]  # noqa: UP007 - built from a list
    if kind == "literal":
        return typing.Literal[tuple(spec[1])]
    if kind == "enum":
        return _enum(spec[1], tuple(spec[2]))
    if kind == "list":
        return list if spec[1] is None else list[decode(spec[1])]
    if kind == "type":
        return type(spec[1], (), {})
    raise ValueError(f"unknown annotation spec {spec!r}")


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def read_transformers() -> tuple[dict[str, Any], dict[str, Any]]:
    """({field: annotation}, {field: default}) of the installed ``TrainingArguments`` (imports it)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}
    defaults = {f.name: _plain(f.default) for f in dataclasses.fields(TrainingArguments)
                if f.default is not dataclasses.MISSING}
    return fields, defaults


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def read_model_types() -> list[str]:
    """The ``model_type`` names of the installed transformers (imports it)."""
    from transformers import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def _table():
    """The facts module, or None when it was written for another transformers (or none is installed)."""
    from lora_cli.recipe import transformers_facts as table

    return table if installed_version() == table.TRANSFORMERS_VERSION else None


@functools.cache
def training_arguments() -> tuple[dict[str, Any], dict[str, Any]]:
    """({field: annotation}, {field: default}) of ``TrainingArguments``: the table's, else the class's."""
    table = _table()
    if table is None:
        return read_transformers()
    return {name: decode(spec) for name, spec in table.FIELDS.items()}, dict(table.DEFAULTS)


@functools.cache
def model_types() -> list[str]:
    """The model types transformers knows: the table's, else from transformers itself."""
    table = _table()
    return list(table.MODEL_TYPES) if table is not None else read_model_types()


def table_text() -> str:
    """The source of ``transformers_facts.py`` for the installed transformers."""
    fields, defaults = read_transformers()
    encoded = {name: encode(annotation) for name, annotation in fields.items()}
    lines = ["{", *(f"    {name!r}: {spec!r}," for name, spec in encoded.items()), "}"]
    return (
        '"""Facts of transformers for recipe checks, written by ``python -m lora_cli.recipe.transformers_table``;\n'
        'do not edit (see that module)."""\n\n'
        f"TRANSFORMERS_VERSION = {installed_version()!r}\n\n"
        f"FIELDS = {chr(10).join(lines)}\n\n"
        f"DEFAULTS = {pprint.pformat(defaults, width=100, compact=True, sort_dicts=False)}\n\n"
        f"MODEL_TYPES = {pprint.pformat(read_model_types(), width=100, compact=True)}\n"
    )

if __name__ == "__main__":
    TABLE.write_text(table_text())
    print(f"wrote {TABLE} (transformers {installed_version()})")
