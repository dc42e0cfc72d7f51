"""`loracli eval / merge / predict` end to end on a run directory built like `train` writes it."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
import yaml

from lora_cli.adapters import LoraConfig, get_adapter_model
from tests.helpers import CLASSES, TINY_VIT, make_imagefolder, tiny_vit
from tests.inference.images_fixture import make_user_images


def _make_run(root):
    from transformers import ViTImageProcessor

    from lora_cli.rundir import save_label_map

    images = make_imagefolder(root / "images")
    run = root / "run"
    id2label = dict(enumerate(CLASSES))
    base = tiny_vit(num_labels=3)
    base.config.id2label, base.config.label2id = id2label, {v: k for k, v in id2label.items()}
    base.save_pretrained(run / "base_model")
    model = get_adapter_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(run / "adapter")
    save_label_map(run / "adapter", id2label)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(run / "processor")
    recipe = {
        "name": "tiny",
        "task": "image-classification",
        "seed": 0,
        "model": {"config": dict(TINY_VIT), "processor": {"size": {"height": 32, "width": 32}}},
        "data": {"imagefolder": str(images)},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                    "modules_to_save": ["classifier"]},
        "training": {"per_device_eval_batch_size": 5},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("cli"))


def loracli(monkeypatch, *args) -> int:
    from lora_cli import cli

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    return exc.value.code


def test_eval_writes_report_and_plot(run_dir, monkeypatch, capsys):
    assert loracli(monkeypatch, "eval", run_dir, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert printed["num_samples"] == saved["num_samples"] == 12 and printed["accuracy"] == saved["accuracy"]
    hand = sum(p["label"] == p["predicted"] for p in saved["predictions"]) / 12
    assert saved["accuracy"] == pytest.approx(hand)
    assert (run_dir / "plots" / "confusion_matrix.png").stat().st_size > 0

    assert loracli(monkeypatch, "eval", run_dir, "--base", "--limit", "6") == 0
    out = capsys.readouterr().out
    assert "macro-F1" in out
    base = json.loads((run_dir / "eval_base.json").read_text())
    assert base["num_samples"] == 6 and base["variant"] == "base"
    assert json.loads((run_dir / "eval.json").read_text()) == saved  # the run's own eval untouched


def test_merge_then_predict_with_merged_model(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert loracli(monkeypatch, "merge", run_dir, "--out", out, "--n", "4") == 0
    err = capsys.readouterr().err
    assert "verified on 4 validation input(s)" in err and (out / "config.json").is_file()
    assert loracli(monkeypatch, "merge", run_dir, "--out", out) == 2
    assert "pass --force" in capsys.readouterr().err

    photos = tmp_path / "photos"
    make_user_images(photos)
    csv_file = tmp_path / "preds.csv"
    code = loracli(monkeypatch, "predict", photos, "--model", out, "--json", "--top-k", "2", "--csv", csv_file)
    captured = capsys.readouterr()
    assert code == 1 and "1 of 5 file(s) could not be predicted" in captured.err
    rows = json.loads(captured.out)
    assert [r["error"] is None for r in rows] == [True, True, True, True, False]
    assert all(len(r["top_k"]) == 2 for r in rows[:4]) and csv_file.is_file()

    # the run (adapter unmerged) and the merged folder predict the same
    assert loracli(monkeypatch, "predict", photos / "c_gray.png", "--model", out, "--json") == 0
    merged_pred = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert loracli(monkeypatch, "predict", photos / "c_gray.png", "--run", run_dir, "--json") == 0
    run_pred = json.loads(capsys.readouterr().out)[0]["top_k"]
    assert [p["label"] for p in merged_pred] == [p["label"] for p in run_pred]
    assert [p["probability"] for p in merged_pred] == pytest.approx([p["probability"] for p in run_pred], abs=1e-5)


def test_predict_table_and_bad_input(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "160")
    photos = tmp_path / "photos"
    make_user_images(photos)
    assert loracli(monkeypatch, "predict", photos, "--run", run_dir) == 1
    out = capsys.readouterr().out
    flat = " ".join(re.sub(r"[│┃]", " ", out).split())  # a narrow terminal wraps the error cell
    assert "a_photo.jpg" in flat and "error: corrupt or truncated" in flat
    assert loracli(monkeypatch, "predict", tmp_path / "nope.jpg", "--run", run_dir) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert loracli(monkeypatch, "predict", photos) == 2
    assert "exactly one of --run" in capsys.readouterr().err


def test_eval_other_adapter(run_dir, tmp_path, monkeypatch, capsys):
    from lora_cli.adapters import AdapterModel

    base = tiny_vit(num_labels=3, seed=5)
    other = AdapterModel.from_pretrained(base, run_dir / "adapter", is_trainable=True)
    with torch.no_grad():
        for param in other.adapter_parameters():
            param.mul_(-1.5)
    other.save_pretrained(tmp_path / "other")
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", tmp_path / "other", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval_adapter-other.json").read_text())
    assert report["variant"] == str(tmp_path / "other") and saved["num_samples"] == 12
    assert loracli(monkeypatch, "eval", run_dir, "--json") == 0
    own = json.loads((run_dir / "eval.json").read_text())
    assert [p["confidence"] for p in saved["predictions"]] != [p["confidence"] for p in own["predictions"]]
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", tmp_path / "missing") == 2


def test_damaged_or_pickled_adapter_is_exit_2_naming_the_file(run_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "adapter", bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", bad) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt safetensors file" in err and "adapter_model.safetensors" in err
    assert "internal error" not in err and "Traceback" not in err

    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    weights.unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**state, "x": Payload()}, bad / "adapter_model.bin")
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", bad) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "can run code" in err and "weights_only" not in err
    assert not marker.exists()

    (bad / "adapter_model.bin").unlink()
    torch.save(state, bad / "adapter_model.bin")  # PEFT's legacy format, plain tensors: loads
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", bad, "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 12


def test_error_messages_neutralise_control_characters(run_dir, tmp_path, monkeypatch, capsys):
    evil = tmp_path / "\x1b]0;pwned\x07\u202eevil.jpg"
    assert loracli(monkeypatch, "predict", evil, "--run", run_dir) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "\\x1b]0;pwned\\x07\\u202eevil.jpg" in err
    assert not any(c in err for c in ("\x1b", "\x07", "\u202e"))

    assert loracli(monkeypatch, "\x1b[2Jnot-a-command") == 2  # click's usage error echoes what was typed
    err = capsys.readouterr().err
    assert "\\x1b[2Jnot-a-command" in err and "\x1b" not in err


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


BANNER = "Setting accelerator to"


@pytest.mark.skipif(not _deepspeed_installed(), reason="the banner comes from deepspeed")
def test_no_third_party_banner_unless_debug(run_dir, tmp_path):
    """transformers' save_pretrained imports deepspeed (through accelerate's unwrap_model),
    which prints its accelerator banner to stdout: merge used to open with it."""
    import subprocess

    # no visible GPU: deepspeed then falls back to the CPU and warns, on every machine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
    merge = subprocess.run(
        [sys.executable, "-m", "lora_cli", "merge", str(run_dir), "--out", str(tmp_path / "m"), "--n", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert merge.returncode == 0, merge.stderr
    assert BANNER not in merge.stdout + merge.stderr
    assert merge.stdout == ""  # stdout stays clean for pipes and --json

    # the same import with --debug keeps the banner (the filter only hides it otherwise)
    probe = (
        "import sys; from lora_cli import cli; cli.STATE['debug'] = sys.argv[1] == 'debug'; import deepspeed"
    )
    quiet = subprocess.run([sys.executable, "-c", probe, "plain"], capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run([sys.executable, "-c", probe, "debug"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert BANNER not in quiet.stdout + quiet.stderr
    assert BANNER in loud.stdout + loud.stderr


@pytest.mark.parametrize("split", ["test", "../../outside"])
def test_eval_refuses_a_split_the_run_does_not_have(run_dir, split, monkeypatch, capsys):
    """`--split test` used to evaluate the validation data and label it test; a path-like
    split name wrote its report outside the run."""
    before = sorted(p.name for p in run_dir.parent.parent.iterdir())
    assert loracli(monkeypatch, "eval", run_dir, "--split", split) == 2
    assert "a run has the splits validation, train" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.parent.parent.iterdir()) == before


def test_eval_adapter_from_the_hub_fails_fast_offline(run_dir, monkeypatch, capsys):
    """--adapter takes a hub id too; offline and not cached, it fails at once saying why."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loracli(monkeypatch, "eval", run_dir, "--adapter", "someone/food101-lora") == 2
    err = capsys.readouterr().err
    assert "--adapter: 'someone/food101-lora'" in err and "offline mode is set" in err
    assert not list(run_dir.glob("eval_adapter-someone*")) and not list(run_dir.glob("eval_adapter-food101*"))
