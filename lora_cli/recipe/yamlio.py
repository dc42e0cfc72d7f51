"""Reading recipe YAML: YAML 1.2 core-schema values, hard limits, and the line of every key.

PyYAML implements YAML 1.1, whose implicit types surprise recipe authors: ``no`` / ``off``
become ``False`` (so ``eval_strategy: no`` is refused), ``1:30`` becomes 90, ``0755`` is
octal and ``2024-01-01`` a date, while ``5e-3`` stays a string. :class:`RecipeLoader`
resolves plain (unquoted) scalars by the YAML 1.2 core schema instead, for recipe files
and command-line override values alike:

========  ===========================================================================
null      ``null`` ``Null`` ``NULL`` ``~`` and an empty value
bool      ``true`` ``True`` ``TRUE`` ``false`` ``False`` ``FALSE`` only; ``yes`` ``no``
          ``on`` ``off`` ``y`` ``n`` are strings
int       ``[-+]?[0-9]+`` in decimal (``0755`` is 755), ``0o755`` octal, ``0x1F`` hex;
          no ``_`` separators, no ``0b`` binary, no ``1:30`` base 60 (those are strings)
float     ``[-+]?(.[0-9]+|[0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)?`` so ``5e-3``, ``1.``
          and ``.5`` are floats; ``.inf`` ``-.inf`` ``.nan`` (any case form 1.2 allows)
str       everything else: dates and times (``2024-01-01``), ``=``, ``1_000``, ``1:30``
========  ===========================================================================

Explicit tags are limited to the core ones (``!!str`` ``!!int`` ``!!float`` ``!!bool``
``!!null`` ``!!seq`` ``!!map``); ``!!timestamp``, ``!!binary``, ``!!set``, ``!!omap`` and
``!!pairs`` are refused, and ``!!bool`` takes only true/false. One YAML 1.1 feature is
kept on purpose: the merge key ``<<: *anchor``.

A recipe is a few KB of settings, so the loader refuses, as a :class:`RecipeError` naming
the file, the line and the limit, anything far past that: a file over
:data:`MAX_FILE_BYTES` (checked with ``stat`` before reading), more than
:data:`MAX_ALIASES` aliases, more than :data:`MAX_NODES` values once aliases are
expanded (a "billion laughs" alias bomb), more than :data:`MAX_TEXT` characters of
scalars once aliases are expanded, an alias inside what it names, nesting deeper than
:data:`MAX_DEPTH`, and integers with more than :data:`MAX_INT_DIGITS` digits. The counts
are kept while the document is composed, so a refusal comes before the work and memory
it would take. The same limits apply to files reached through ``extends:`` and to
override values.

Line numbers come from the composed node tree, so every problem can point at the line
that caused it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB); shipped recipes are 1-3 KB."""
MAX_NODES = 20_000
"""Most values (scalars, lists, mappings, keys included) one document may expand to."""
MAX_ALIASES = 1_000
"""Most aliases (``*name``) in one document."""
MAX_TEXT = 1 << 20
"""Most characters of scalars one document may expand to through aliases."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings."""
MAX_INT_DIGITS = 100
"""Longest integer, in digits (Python refuses to parse ones past 4,300)."""

LIMIT_HINT = "a recipe is a few KB of settings; is this file generated, corrupt or hostile?"

STR = "tag:yaml.org,2002:str"
_BOOL_TRUE = ("true", "True", "TRUE")
_BOOL_FALSE = ("false", "False", "FALSE")
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = re.compile(r"\.(?:nan|NaN|NAN)")


class LimitError(yaml.YAMLError):
    """A document past one of the loader's limits: what, the line (when known) and the fix."""

    def __init__(self, message: str, mark: yaml.Mark | None = None, hint: str = LIMIT_HINT):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.line = mark.line + 1 if mark is not None else None


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and limits on size, aliases and depth."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._aliases = 0
        self._text = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters) it expands to

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                self._aliases += 1
                if self._aliases > MAX_ALIASES:
                    raise LimitError(
                        f"uses more than {MAX_ALIASES:,} aliases (*name), the limit for a recipe",
                        event.start_mark,
                    )
                size = self._sizes.get(id(node))
                if size is None:
                    raise LimitError(
                        f"has an alias *{event.anchor} inside the list or mapping &{event.anchor} it names "
                        "(a recursive alias)",
                        event.start_mark,
                        "a recipe is a tree: write the values out instead of referring back",
                    )
                self._count(size[0], size[1], event.start_mark)
            return super().compose_node(parent, index)
        event = self.peek_event()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise LimitError(f"nests lists and mappings deeper than {MAX_DEPTH} levels, the limit for a recipe",
                             event.start_mark)
        nodes, text = self._nodes, self._text
        text_here = len(event.value) if isinstance(event, yaml.ScalarEvent) else 0
        self._count(1, text_here, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = (self._nodes - nodes, self._text - text)
        return node

    def fetch_flow_collection_start(self, TokenClass):  # noqa: N803 - PyYAML's name
        # The scanner reads ahead through a run of '[' / '{' before the composer sees one
        # node: refuse here, at the first bracket past the limit, not after the whole run.
        if self.flow_level >= MAX_DEPTH:
            raise LimitError(f"nests lists and mappings deeper than {MAX_DEPTH} levels, the limit for a recipe",
                             self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def _count(self, nodes: int, text: int, mark: yaml.Mark) -> None:
        self._nodes += nodes
        self._text += text
        if self._nodes > MAX_NODES:
            raise LimitError(
                f"expands to more than {MAX_NODES:,} values (an alias counts every value it repeats), "
                "the limit for a recipe",
                mark,
                "this is what a YAML alias bomb looks like; write the values out or use fewer aliases",
            )
        if self._text > MAX_TEXT:
            raise LimitError(
                f"repeats more than {MAX_TEXT:,} characters of text through aliases, the limit for a recipe",
                mark,
                "write the value once, without aliases",
            )

    def compose_document(self):
        self._sizes = {}
        try:
            return super().compose_document()
        finally:
            self._sizes = {}

    # ----------------------------------------------------------- YAML 1.2 core constructors
    def construct_yaml_bool(self, node):
        value = self.construct_scalar(node)
        if value in _BOOL_TRUE:
            return True
        if value in _BOOL_FALSE:
            return False
        raise yaml.constructor.ConstructorError(
            None, None, f"!!bool takes true or false, not {value!r}", node.start_mark
        )

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        if not _INT.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{value!r} is not a YAML 1.2 integer (e.g. 42, 0o755, 0x1F)", node.start_mark
            )
        if len(value) > MAX_INT_DIGITS:
            raise LimitError(f"has an integer of {len(value):,} digits; the limit is {MAX_INT_DIGITS}",
                             node.start_mark, "no recipe setting needs such a number")
        if value.startswith("0o"):
            return int(value[2:], 8)
        if value.startswith("0x"):
            return int(value[2:], 16)
        return int(value, 10)

    def construct_yaml_float(self, node):
        value = self.construct_scalar(node)
        if _NAN.fullmatch(value):
            return math.nan
        if _INF.fullmatch(value):
            return -math.inf if value.startswith("-") else math.inf
        if not _FLOAT.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{value!r} is not a YAML 1.2 number (e.g. 0.5, 5e-3, .inf)", node.start_mark
            )
        return float(value)

    def construct_refused(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise yaml.constructor.ConstructorError(
            None, None,
            f"the tag {tag} is not allowed in a recipe; use plain values (strings, numbers, "
            "true/false, null, lists and mappings)",
            node.start_mark,
        )


def _core_resolvers() -> dict:
    """The implicit resolvers of the YAML 1.2 core schema, plus the merge key ``<<``."""
    table: dict = {}

    def add(tag: str, pattern: str, first: str) -> None:
        regexp = re.compile(rf"^(?:{pattern})$")
        for ch in first:
            table.setdefault(ch, []).append((tag, regexp))

    add("tag:yaml.org,2002:null", r"~|null|Null|NULL|", "~nN")
    table.setdefault("", []).append(("tag:yaml.org,2002:null", re.compile(r"^$")))
    add("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF")
    add("tag:yaml.org,2002:int", _INT.pattern, "-+0123456789")
    add("tag:yaml.org,2002:float",
        rf"{_FLOAT.pattern}|{_INF.pattern}|{_NAN.pattern}", "-+0123456789.")
    add("tag:yaml.org,2002:merge", r"<<", "<")
    return table


RecipeLoader.yaml_implicit_resolvers = _core_resolvers()
RecipeLoader.add_constructor("tag:yaml.org,2002:bool", RecipeLoader.construct_yaml_bool)
RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_yaml_float)
# ``<<`` is the merge key only as a key; as a value it is the string "<<".
RecipeLoader.add_constructor("tag:yaml.org,2002:merge", yaml.constructor.SafeConstructor.construct_yaml_str)
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    RecipeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", RecipeLoader.construct_refused)
RecipeLoader.add_constructor(None, RecipeLoader.construct_refused)


def core_tag(text: str) -> str:
    """The tag :class:`RecipeLoader` gives ``text`` written as a plain scalar."""
    for tag, regexp in RecipeLoader.yaml_implicit_resolvers.get(text[:1], []):
        if regexp.match(text):
            return tag
    return STR


def parse_value(text: str) -> Any:
    """One YAML scalar or flow value (``1e-3`` -> 0.001, ``[a, b]`` -> list, ``""`` -> None).

    Raises :class:`LimitError` past the loader's limits, ``yaml.YAMLError`` for bad YAML.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise LimitError(f"is {len(text):,} characters long, over the {MAX_FILE_BYTES:,}-byte limit for a recipe")
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


class _Dumper(yaml.SafeDumper):
    """Block mappings; short lists of scalars on one line (``[query, value]``).

    A string is written plain only when both YAML 1.1 (PyYAML's safe_load) and
    :class:`RecipeLoader` read it back as that string: ``'yes'``, ``'0o755'`` and
    ``'1e3'`` are quoted.
    """

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0]:
            core = core_tag(value)
            if core != STR:
                return core
        return tag


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump(data: Any) -> str:
    """YAML text that :class:`RecipeLoader` reads back to equal data."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
