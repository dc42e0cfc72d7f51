"""`loracli validate` and `loracli recipes` (list / show / copy), through the real entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli import cli
from lora_cli.recipe import load_recipe, shipped_recipes
from tests.recipe._util import VALID

LORACLI = Path(sys.executable).parent / "loracli"


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `loracli ARGS` in-process through cli.main: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["loracli", *args])
    monkeypatch.setenv("COLUMNS", "120")
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_ok(write, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "validate", str(write(VALID)), "adapter.r=8")
    assert code == 0
    assert "ok recipe.yaml: image-classification / lora / vit from config -> runs/tiny" in err


def test_validate_bad_recipe_exits_2_without_traceback(write, monkeypatch, capsys):
    path = write(VALID.replace("  lora_alpha: 8", "  lora_alfa: 8"))
    code, out, err = run(monkeypatch, capsys, "validate", str(path), "training.learnin_rate=1")
    assert code == 2
    assert "error: invalid recipe recipe.yaml (2 problems):" in err
    assert "recipe.yaml:18: adapter.lora_alfa: is not a lora setting (got 8; did you mean lora_alpha?)" in err
    assert "did you mean training.learning_rate?" in err
    assert "Traceback" not in err + out


def test_validate_missing_file_exits_2(write, monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "validate", "nope.yaml")
    assert code == 2 and "nope.yaml: recipe file nope.yaml not found" in err


@pytest.mark.slow
def test_validate_console_script(write, tmp_path):
    """The installed `loracli` process: exit code 2, the message on stderr, no traceback."""
    if not LORACLI.exists():
        pytest.skip("loracli console script is not installed in this environment")
    bad = write(VALID.replace("  r: 4", "  r: 0"), "bad.yaml")
    done = subprocess.run(
        [str(LORACLI), "validate", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "bad.yaml:17: adapter.r: must be an integer >= 1 (got 0)" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_recipes_lists_every_shipped_recipe(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "recipes")
    assert code == 0
    assert "Shipped recipes" in out
    for name in shipped_recipes():
        assert name in out
    assert "Offline start" in out


def test_recipes_show(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "recipes", "show", "quickstart")
    assert code == 0
    assert out == shipped_recipes()["quickstart"].read_text()
    assert "# higher rank: more capacity, more memory" in out


def test_recipes_show_unknown_name(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "recipes", "show", "quikstart")
    assert code == 2 and "no shipped recipe named 'quikstart' (did you mean quickstart?)" in err


def test_recipes_copy_and_refuse_to_overwrite(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "mine.yaml"
    code, _, err = run(monkeypatch, capsys, "recipes", "copy", "food101_lora", str(dest))
    assert code == 0 and "copied food101_lora.yaml" in err
    assert dest.read_text() == shipped_recipes()["food101_lora"].read_text()

    dest.write_text("# my edits\n")
    code, _, err = run(monkeypatch, capsys, "recipes", "copy", "food101_lora", str(dest))
    assert code == 2 and "already exists" in err
    assert dest.read_text() == "# my edits\n"


def test_recipes_copy_into_a_folder(tmp_path, monkeypatch, capsys):
    code, _, _ = run(monkeypatch, capsys, "recipes", "copy", "quickstart.yaml", str(tmp_path))
    assert code == 0 and (tmp_path / "quickstart.yaml").is_file()
    code, _, err = run(monkeypatch, capsys, "recipes", "copy", "quickstart", str(tmp_path))
    assert code == 2 and "already exists" in err


def test_a_copied_recipe_that_extends_another_still_finds_it(tmp_path, monkeypatch, capsys):
    dest = tmp_path / "mine.yaml"
    code, _, err = run(monkeypatch, capsys, "recipes", "copy", "quickstart_mica", str(dest))
    assert code == 0 and "it extends the shipped quickstart.yaml; to edit what that one sets, copy it too" in err
    # shipped recipes name their parent as shipped:NAME, so the copy is the file as shipped
    assert dest.read_text() == shipped_recipes()["quickstart_mica"].read_text()
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(dest)
    assert recipe.adapter.options["init_lora_weights"] == "mica" and recipe.model.config["model_type"] == "vit"
    assert recipe == load_recipe(shipped_recipes()["quickstart_mica"])


def test_copy_turns_a_relative_extends_into_a_shipped_reference():
    from lora_cli.commands.recipes import _anchored_extends

    folder = shipped_recipes()["quickstart"].parent
    text, parent = _anchored_extends("# x\nextends: 'quickstart.yaml'   # the base\nname: y\n", folder)
    assert text == '# x\nextends: "shipped:quickstart.yaml"  # the base\nname: y\n' and parent == "quickstart.yaml"
    text, parent = _anchored_extends("extends: ../elsewhere.yaml\n", folder)
    assert text == f'extends: "{folder.parent / "elsewhere.yaml"}"\n' and parent == str(folder.parent / "elsewhere.yaml")
    assert _anchored_extends("name: z\n", folder) == ("name: z\n", None)
