"""The method table: names come from the config class; malformed or taken names are refused."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest

import lora_cli.adapters
from lora_cli.adapters import (
    AdapterConfig,
    LoraLayer,
    available_methods,
    get_method,
    register_method,
    registry,
)
from lora_cli.errors import UserInputError

ENGINE = Path(lora_cli.adapters.__file__).parent


def _config(method: str, peft_type: str) -> type[AdapterConfig]:
    cls = type("TestConfig", (AdapterConfig,), {"__annotations__": {"method": ClassVar[str], "peft_type": ClassVar[str]},
                                                 "method": method, "peft_type": peft_type})
    return dataclasses.dataclass(cls)


@pytest.fixture
def table(monkeypatch):
    """The registry's table, restored after the test."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    return registry._METHODS


def test_every_method_is_registered_under_its_config_names():
    assert available_methods() == ["adalora", "loha", "lokr", "lora", "p_tuning", "trainable_tokens", "xlora"]
    for name in available_methods():
        method = get_method(name)
        assert (method.name, method.peft_type) == (method.config_cls.method, method.config_cls.peft_type)
        assert get_method(method.peft_type) is method


def test_register_reads_name_and_peft_type_from_the_config(table):
    method = register_method(_config("vera_test", "VERA_TEST"), LoraLayer, prefix="vera_")
    assert (method.name, method.peft_type, method.prefix, method.state_cls) == ("vera_test", "VERA_TEST", "vera_", None)
    assert get_method("VERA_TEST") is method and "vera_test" in available_methods()


@pytest.mark.parametrize(
    ("method", "peft_type", "match"),
    [
        ("lora", "LORA_TWO", r"'lora' already names the lora method"),
        ("lora_two", "LORA", r"'lora' already names the lora method"),
        ("hada", "LOHA", r"'loha' already names the loha method"),
        ("adalora", "ADALORA", r"'adalora' already names the adalora method"),
    ],
)
def test_register_refuses_a_taken_name(table, method, peft_type, match):
    with pytest.raises(ValueError, match=match):
        register_method(_config(method, peft_type), LoraLayer, prefix="lora_")
    assert get_method("lora").config_cls.__name__ == "LoraConfig"


@pytest.mark.parametrize(
    ("method", "peft_type", "prefix", "match"),
    [
        ("", "X", "x_", r"method must be a lower-case identifier"),
        ("My Method", "X", "x_", r"method must be a lower-case identifier"),
        ("x", "", "x_", r"peft_type must be an upper-case identifier"),
        ("x", "x", "x_", r"peft_type must be an upper-case identifier"),
        ("x", "X", "x", r"prefix must look like 'lora_'"),
        ("x", "X", "", r"prefix must look like 'lora_'"),
    ],
)
def test_register_refuses_malformed_names(table, method, peft_type, prefix, match):
    with pytest.raises(ValueError, match=match):
        register_method(_config(method, peft_type), LoraLayer, prefix=prefix)
    assert "x" not in available_methods()


def test_register_refuses_a_layer_that_is_no_adapter_layer(table):
    with pytest.raises(TypeError, match="layer_cls must be an AdapterLayer subclass"):
        register_method(_config("x", "X"), object, prefix="x_")


def test_unknown_method_says_what_there_is():
    with pytest.raises(UserInputError, match=r"unknown adapter method 'loar'.*did you mean 'lora'"):
        get_method("loar")


def _engine_imports() -> dict[str, tuple[set[str], list[str]]]:
    """module -> (engine modules imported at top level, imports of engine modules inside functions)."""
    modules = {".".join(p.relative_to(ENGINE.parent.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in ENGINE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                top |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                top |= {a.name for a in node.names}
        hidden = [ast.unparse(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
                  and "lora_cli" in ast.unparse(n)]
        out[name] = ({m for m in top if m in modules} - {name, "lora_cli.adapters"}, hidden)
    return out


def test_engine_modules_import_each_other_without_a_cycle():
    imports = _engine_imports()
    assert {name: hidden for name, (_, hidden) in imports.items() if hidden} == {}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join((*path, name))
        if name in done:
            return
        for dep in imports[name][0]:
            if not (dep == "lora_cli.adapters.methods" and name.startswith(dep + ".")):  # the package of a method file
                visit(dep, (*path, name))
        done.add(name)

    for name in imports:
        visit(name, ())
