"""`loracli combine`: trained runs -> a new run that eval, merge and predict take like any run."""

from __future__ import annotations

import json

import pytest
import torch

from lora_cli import rundir as rd
from lora_cli.inference.loading import load_run
from tests.helpers import make_imagefolder
from tests.inference.images_fixture import make_user_images
from tests.inference.runs_fixture import edit_adapter, folder_bytes, make_run
from tests.training._util import loracli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    images = make_imagefolder(root / "images")
    return {
        "a": make_run(root, "a", images, seed=1),
        "b": make_run(root, "b", images, seed=2),
        "loha": make_run(root, "loha", images, method="loha", seed=3),
        "other_base": make_run(root, "other_base", images, seed=4, base_seed=9),
        "other_labels": make_run(root, "other_labels", images, seed=5, classes=("x", "y", "z")),
        # factors about 1e18, deltas about 1e37: finite, but 50 times that overflows float32
        "huge": edit_adapter(make_run(root, "huge", images, seed=6),
                             lambda key, t: t * 1e19 if ".lora_" in key else t),
        "nan": edit_adapter(make_run(root, "nan", images, seed=7),
                            lambda key, t: t.fill_(float("nan")) if key.endswith("1.attention.v_proj.lora_B.weight") else t),
    }


def test_combined_run_works_with_eval_merge_predict(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ab"
    code = loracli(monkeypatch, "combine", runs["a"], runs["b"], "--weights", "0.7,0.3", "--how", "ties",
                   "--density", "0.5", "--out", out)
    assert code == 0, capsys.readouterr().err
    assert "ties of 0.7 x" in capsys.readouterr().err
    assert rd.is_run_dir(out) and rd.read_status(out)["state"] == "completed"
    assert json.loads((out / "combine.json").read_text())["how"] == "ties"
    assert rd.read_label_map(out / rd.ADAPTER_DIR) == rd.read_label_map(runs["a"] / rd.ADAPTER_DIR)

    assert loracli(monkeypatch, "eval", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 12
    assert loracli(monkeypatch, "merge", out, "--out", tmp_path / "merged", "--n", "4") == 0
    assert "verified on 4" in capsys.readouterr().err
    photos = tmp_path / "photos"
    make_user_images(photos)
    assert loracli(monkeypatch, "predict", photos / "c_gray.png", "--run", out, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top_k"]) == 3


def test_cat_combination_is_the_weighted_sum_and_heads_are_averaged(runs, tmp_path, monkeypatch):
    out = tmp_path / "cat"
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--weights", "0.7,-0.3", "--how", "cat",
                   "--out", out) == 0
    combined, a, b = (load_run(r, device="cpu").model for r in (out, runs["a"], runs["b"]))
    assert combined.peft_config["default"].r == 8
    layers_a, layers_b = dict(a.adapter_layers()), dict(b.adapter_layers())
    with torch.no_grad():
        for path, layer in combined.adapter_layers():
            expected = 0.7 * layers_a[path].get_delta_weight("default") - 0.3 * layers_b[path].get_delta_weight("default")
            torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-5, rtol=1e-4)
        heads = [m.base_model.classifier.modules_to_save["default"].weight for m in (combined, a, b)]
        torch.testing.assert_close(heads[0], (0.7 * heads[1] - 0.3 * heads[2]) / 0.4)


@pytest.mark.parametrize(("other", "match"), [
    ("loha", "adapter method"),
    ("other_base", "base model weights"),
    ("other_labels", "label map"),
])
def test_incompatible_runs_are_refused(other, match, runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad"
    assert loracli(monkeypatch, "combine", runs["a"], runs[other], "--out", out) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_arguments_write_nothing(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    cases = [
        (["--weights", "0.7"], "1 number(s) for 2 run(s)"),
        (["--weights", "a,b"], "comma-separated"),
        (["--how", "average"], "is unknown"),
        (["--how", "ties"], "needs density"),
    ]
    for extra, match in cases:
        assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", out, *extra) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()
    assert loracli(monkeypatch, "combine", runs["a"], "--out", out) == 2
    assert "two or more" in capsys.readouterr().err


def test_output_folder_safety(runs, tmp_path, monkeypatch, capsys):
    before = folder_bytes(runs["a"])
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", runs["a"], "--overwrite") == 2
    assert "which this command reads" in capsys.readouterr().err
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", runs["a"] / "adapter" / "x") == 2
    assert "the run's own adapter" in capsys.readouterr().err
    assert folder_bytes(runs["a"]) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", mine) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", mine, "--overwrite") == 2
    assert "--overwrite replaces only a folder an earlier `loracli combine` wrote" in capsys.readouterr().err
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", runs["loha"], "--overwrite") == 2
    assert "combine.json" in capsys.readouterr().err  # a trained run is not combine's to replace
    assert (mine / "notes.txt").read_text() == "keep me"

    out = tmp_path / "ab"
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", out) == 0
    first = (out / rd.ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", out) == 2
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--out", out, "--overwrite",
                   "--weights", "0.2,0.8") == 0
    assert (out / rd.ADAPTER_DIR / "adapter_model.safetensors").read_bytes() != first


@pytest.mark.parametrize(("weights", "match"), [
    ("1e300,1e300", "between -100 and 100"),
    ("inf,1", "finite"),
    ("nan,0.5", "finite"),
    ("1,-1e5", "between -100 and 100"),
])
def test_non_finite_or_absurd_weights_are_refused_at_the_option(weights, match, runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ab"
    assert loracli(monkeypatch, "combine", runs["a"], runs["b"], "--weights", weights, "--out", out) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and match in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_a_combination_that_overflows_is_refused_naming_the_layer(how, runs, tmp_path, monkeypatch, capsys):
    """Finite inputs and weights whose combination overflows float32: exit 1, the layer named, nothing
    written (before: `cat` / `linear` wrote inf / NaN tensors with exit 0, `svd` died inside the SVD)."""
    with torch.no_grad():  # the source itself is finite, deltas included
        assert all(torch.isfinite(layer.get_delta_weight("default")).all()
                   for _, layer in load_run(runs["huge"], device="cpu").model.adapter_layers())
    out = tmp_path / "huge"
    assert loracli(monkeypatch, "combine", runs["huge"], runs["a"], "--weights", "50,50", "--how", how,
                   "--out", out) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "vit.layers." in err and "internal error" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_run_holding_nan_is_refused_naming_file_and_tensor(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ab"
    assert loracli(monkeypatch, "combine", runs["a"], runs["nan"], "--out", out) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and "vit.layers.1.attention.v_proj.lora_B.weight" in err
    assert "NaN" in err and not out.exists()
