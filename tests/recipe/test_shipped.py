"""Every shipped recipe validates and says what the guide says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lora_cli
from lora_cli.adapters import available_methods
from lora_cli.recipe import load_recipe, recipes_dir, resolve_adapter_config, shipped_recipes
from lora_cli.recipe.data import DATA_PATHS
from lora_cli.recipe.errors import RecipeError
from lora_cli.recipe.shipped import shipped_path
from lora_cli.recipe.yamlio import RecipeLoader
from lora_cli.task_kinds import TASKS

SHIPPED = shipped_recipes()


def test_the_expected_recipes_ship():
    assert {"quickstart", "food101_lora", "food101_loha", "food101_lokr", "food101_adalora"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_validates(name):
    path = SHIPPED[name]
    recipe = load_recipe(path)
    # the method the file names, or the one of the recipe it extends
    method = (_raw(path).get("adapter") or {}).get("method", recipe.adapter.method)
    assert method in available_methods(), f"{name} uses {method}, which the engine does not register"
    assert recipe.name and recipe.task in TASKS
    assert recipe.adapter.method == method
    assert resolve_adapter_config(recipe.adapter, total_step=10_000).method == method
    assert isinstance(recipe.training["learning_rate"], float)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "adalora"])
def test_food101_recipes_follow_the_peft_guide(method):
    recipe = load_recipe(SHIPPED[f"food101_{method}"])
    assert recipe.model.name_or_path == "google/vit-base-patch16-224-in21k"
    assert recipe.data.dataset == "food101"
    assert recipe.adapter.options["target_modules"] == ["query", "value"]
    assert recipe.adapter.options["modules_to_save"] == ["classifier"]
    assert recipe.training == {
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 128,
        "gradient_accumulation_steps": 4,
        "fp16": True,
        "num_train_epochs": 5,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "logging_steps": 10,
    }
    assert recipe.output_path.as_posix() == f"runs/food101-{method}"


def test_quickstart_is_offline():
    recipe = load_recipe(SHIPPED["quickstart"])
    assert recipe.model.name_or_path is None
    assert recipe.model.config["model_type"] == "vit"
    assert recipe.data.builtin == "digits"
    assert recipe.data.val_split == 0.2
    assert recipe.model_label() == "vit from config"


def test_adalora_total_step_is_derived_later():
    recipe = load_recipe(SHIPPED["food101_adalora"])
    assert "total_step" not in recipe.adapter.options
    assert "total_step" not in recipe.to_yaml()
    assert resolve_adapter_config(recipe.adapter, total_step=5000).total_step == 5000
    with pytest.raises(Exception, match="needs total_step"):
        resolve_adapter_config(recipe.adapter, total_step=None)


# ------------------------------------------------------- issue 24: portable shipped recipes
RECORD = json.loads((Path(__file__).parent / "shipped_resolved_before_issue24.json").read_text(encoding="utf-8"))
NEAR_COPIES = {
    "food101_loha": "food101_lora", "food101_lokr": "food101_lora", "food101_adalora": "food101_lora",
    "quickstart_eva": "quickstart", "quickstart_corda": "quickstart",
    "minilm_sentiment_eva": "minilm_sentiment_lora", "minilm_sentiment_corda": "minilm_sentiment_lora",
}


def _resolved(name: str) -> dict:
    root = str(recipes_dir().parent)
    return json.loads(json.dumps(load_recipe(SHIPPED[name]).to_dict()).replace(root, "<root>"))


def _raw(path: Path) -> dict:
    return RecipeLoader(path.read_text(encoding="utf-8")).get_single_data()


@pytest.mark.parametrize("name", sorted(RECORD["recipes"]))
def test_resolved_recipe_is_what_it_was_before_the_rewrite(name, tmp_path, monkeypatch):
    """The recipes issue 24 rewrote (near-copies now extend their base; shipped: data and
    extends) resolve to the very dict they did before, from any current directory."""
    monkeypatch.chdir(tmp_path)
    recorded = RECORD["recipes"][name]
    assert _as_recorded(_resolved(name), recorded) == recorded


def _as_recorded(value, recorded):
    """``value`` without the keys the schema gained after the record was made (the chat-data
    fields, at their defaults): every key the record holds is still compared."""
    if isinstance(value, dict) and isinstance(recorded, dict):
        return {k: _as_recorded(v, recorded[k]) if k in recorded else v
                for k, v in value.items() if k in recorded}
    return value


@pytest.mark.parametrize(("name", "base"), sorted(NEAR_COPIES.items()))
def test_near_copies_extend_their_base(name, base):
    data = _raw(SHIPPED[name])
    assert data["extends"] == f"shipped:{base}.yaml"
    assert not {"model", "data", "task"} & set(data), f"{name} repeats what {base} sets"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes_name_shipped_files_portably(name):
    """`recipes show NAME > my.yaml` and an installed wheel work from any directory: a shipped
    recipe reaches other shipped files only through shipped: references, and they exist."""
    raw = _raw(SHIPPED[name])
    refs = [raw["extends"]] if "extends" in raw else []
    refs += [v for k, v in (raw.get("data") or {}).items() if k in DATA_PATHS and v]
    for ref in refs:
        assert ref.startswith("shipped:"), f"{name}: {ref!r} depends on the current directory or checkout"
        assert shipped_path(ref).is_file(), ref


def test_installed_package_data_is_preferred_to_the_checkout(tmp_path, monkeypatch):
    """A wheel puts recipes/ at lora_cli/shipped_recipes/ (setup.py); a checkout has ../recipes."""
    package = tmp_path / "site" / "lora_cli"
    (package / "shipped_recipes" / "data").mkdir(parents=True)
    (package / "shipped_recipes" / "mine.yaml").write_text("# one\nname: x\n")
    (package / "shipped_recipes" / "data" / "rows.csv").write_text("text,label\n")
    monkeypatch.setattr(lora_cli, "__file__", str(package / "__init__.py"))
    assert recipes_dir() == package / "shipped_recipes"
    assert list(shipped_recipes()) == ["mine"]
    assert shipped_path("shipped:data/rows.csv") == package / "shipped_recipes" / "data" / "rows.csv"
    (package / "shipped_recipes" / "mine.yaml").unlink()
    (package / "shipped_recipes" / "data" / "rows.csv").unlink()
    (package / "shipped_recipes" / "data").rmdir()
    (package / "shipped_recipes").rmdir()
    checkout = tmp_path / "site" / "recipes"
    checkout.mkdir()
    assert recipes_dir() == checkout


@pytest.mark.parametrize("ref", ["shipped:", "shipped:../pyproject.toml", "shipped:/etc/passwd", "shipped:data/../../x"])
def test_a_shipped_reference_stays_inside_the_folder(ref):
    with pytest.raises(ValueError, match="must name a file inside the shipped recipes folder"):
        shipped_path(ref)


CHAT_RECIPE = """name: chat
task: causal-lm
model: {config: {model_type: gpt2, n_layer: 1, n_embd: 8, n_head: 2, vocab_size: 50}}
data: {train_file: shipped:data/rows.jsonl, format: messages, chat_template: TEMPLATE}
adapter: {method: lora, target_modules: [c_attn]}
"""


def test_a_chat_template_file_is_found_in_the_shipped_folder_from_anywhere(tmp_path, monkeypatch):
    """data.chat_template: shipped:<file> resolves like the data paths (installed package data
    here), and a reference leaving the folder is a recipe problem, not a read elsewhere."""
    package = tmp_path / "site" / "lora_cli"
    (package / "shipped_recipes" / "data").mkdir(parents=True)
    (package / "shipped_recipes" / "data" / "rows.jsonl").write_text('{"messages": []}\n')
    (package / "shipped_recipes" / "chat.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setattr(lora_cli, "__file__", str(package / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    recipe_file = tmp_path / "chat.yaml"
    recipe_file.write_text(CHAT_RECIPE.replace("TEMPLATE", "shipped:chat.jinja"))
    recipe = load_recipe(recipe_file)
    assert recipe.data.chat_template == str(package / "shipped_recipes" / "chat.jinja")
    assert recipe.data.train_file == str(package / "shipped_recipes" / "data" / "rows.jsonl")
    for ref, message in [("shipped:../chat.jinja", "must name a file inside the shipped recipes folder"),
                         ("shipped:nope.jinja", "is neither a Jinja template nor a template file")]:
        recipe_file.write_text(CHAT_RECIPE.replace("TEMPLATE", ref))
        with pytest.raises(RecipeError, match=message) as caught:
            load_recipe(recipe_file)
        assert "data.chat_template" in str(caught.value) and len(caught.value.problems) == 1


def test_the_command_line_takes_a_shipped_recipe_by_reference(tmp_path, monkeypatch):
    """`loracli train shipped:quickstart.yaml` as `extends: shipped:quickstart.yaml`, from any folder;
    a file of that very name wins; a wrong name says which ones ship."""
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("shipped:quickstart.yaml", ["adapter.r=4"])
    assert recipe.source == (recipes_dir() / "quickstart.yaml").resolve()
    assert recipe.name == "quickstart" and recipe.adapter.options["r"] == 4
    with pytest.raises(RecipeError) as err:
        load_recipe("shipped:quickstrat.yaml")
    assert "names no shipped recipe" in str(err.value) and "did you mean shipped:quickstart.yaml" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe("shipped:../pyproject.toml")
    assert "must name a file inside the shipped recipes folder" in str(err.value)
    own = tmp_path / "shipped:quickstart.yaml"
    own.write_text((recipes_dir() / "quickstart.yaml").read_text().replace("name: quickstart", "name: mine"))
    assert load_recipe("shipped:quickstart.yaml").name == "mine"
