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


CONFIG_MODULES = ("lora_cli.adapters.config", "lora_cli.adapters.methods.lora.config", "lora_cli.adapters.methods.lora.starts",
                  "lora_cli.adapters.methods.adalora.config", "lora_cli.adapters.methods.lycoris.config",
                  "lora_cli.adapters.methods.trainable_tokens.config", "lora_cli.adapters.methods.p_tuning.config",
                  "lora_cli.adapters.methods.xlora.config")
TORCH_FREE = f"""
import sys
import {", ".join(CONFIG_MODULES)}
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.methods.lora import starts
from lora_cli.adapters.registry import available_methods, get_method

looked_up = {{name: get_method(name).config_cls for name in available_methods()}}
assert looked_up["lora"] is get_method("LORA").config_cls and len(looked_up) >= 7, looked_up
assert all(cls.__module__.endswith(".config") for cls in looked_up.values()), looked_up  # a method's config.py
config = AdapterConfig.from_dict({{"peft_type": "LOHA", "r": 4}}, source="x.json")
assert type(config) is looked_up["loha"] and config.r == 4
assert starts.find("pissa_niter_4").rewrites_base and starts.find("eva").needs_data and starts.DATA_DRIVEN
loaded = [name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "safetensors", "datasets")]
assert not loaded, loaded
"""


def test_configs_and_the_method_table_import_no_torch():
    """Validating a recipe needs the configs, the start table and the method table: none imports torch."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ENGINE.parent.parent)}
    done = subprocess.run([sys.executable, "-c", TORCH_FREE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_configs_check_their_values_without_torch():
    """A config read and checked in a process without torch: the same problems as here."""
    import os
    import subprocess
    import sys

    code = ("import sys, json\nfrom lora_cli.adapters.config import AdapterConfig\nfrom lora_cli.errors import AdapterConfigError\n"
            "try:\n    AdapterConfig.from_dict({'peft_type': 'LORA', 'r': 0, 'init_lora_weights': 'eva', "
            "'eva_config': {'rho': 0.5}}, source='x.json')\nexcept AdapterConfigError as exc:\n"
            "    print(json.dumps(sorted(str(p.key) for p in exc.problems)))\n"
            "assert 'torch' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ENGINE.parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == '["eva_config.rho", "r"]'


def test_every_reference_in_the_tables_loads():
    """The method table's and the start table's "module:attribute" references name what is there."""
    from lora_cli.adapters.methods.lora import starts

    for name in available_methods():
        method = get_method(name)
        for ref in (method.layer, method.state, method.model, method.to_original_base, *method.injectors,
                    *method.kind_layers.values()):
            assert ref is None or callable(registry.load(ref)), (name, ref)
        assert method.layer is not None or method.model is not None
    for start in starts.STARTS:
        for kind in (*start.kinds, *start.plain_on):
            assert callable(start.layer_function(kind)), start.name
        if start.needs_data:
            assert callable(start.calibration()) and callable(start.apply_function()), start.name
