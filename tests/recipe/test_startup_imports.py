"""Recipe problems are answered before torch, transformers or datasets are imported (issue 24).

Each command runs in a fresh ``python -X importtime`` process, whose stderr names every module
it imports; the test reads which top-level packages appear there. Not a timing test: the CPU
figures are ``python -m bench.startup``'s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "peft", "bitsandbytes")


def imported(*args: str, cwd: Path) -> tuple[int, str, set[str]]:
    """(exit code, stderr without the import lines, the top-level packages imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lora_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    names, lines = set(), []
    for line in done.stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", line)
        if found:
            names.add(found.group(1).split(".")[0])
        elif not line.startswith("import time:"):
            lines.append(line)
    assert "lora_cli" in names, "the import trace is empty: -X importtime did not report"
    return done.returncode, "\n".join(lines), names


@pytest.fixture
def bad_recipe(tmp_path) -> Path:
    """The quickstart recipe with a misspelt adapter key and a data folder that does not exist."""
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    text = text.replace("lora_alpha:", "lora_alhpa:").replace("builtin: digits", "imagefolder: no-such-photos")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_validate_good_recipe_imports_no_torch(tmp_path):
    code, err, names = imported("validate", str(ROOT / "recipes" / "quickstart.yaml"), cwd=tmp_path)
    assert code == 0, err
    assert "ok " in err
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.parametrize("verb", ["validate", "train"])
def test_bad_recipe_reported_before_torch(verb, bad_recipe, tmp_path):
    code, err, names = imported(verb, str(bad_recipe), f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert code == 2, err
    assert "did you mean lora_alpha?" in err and "data.imagefolder: folder not found" in err
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    assert not (tmp_path / "run").exists()


def test_help_imports_no_torch(tmp_path):
    code, err, names = imported("--help", cwd=tmp_path)
    assert code == 0, err
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_transformers_quieted_once_imported():
    """Its progress bars and load reports are turned off when transformers is imported later."""
    code = ("from lora_cli import cli\n"
            "cli.main_options(debug=False, version=False)\n"
            "import sys; assert 'transformers' not in sys.modules\n"
            "from transformers.utils import logging as hf\n"
            "print(hf.get_verbosity(), hf.is_progress_bar_enabled())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40", "False"]  # logging.ERROR, no bars
