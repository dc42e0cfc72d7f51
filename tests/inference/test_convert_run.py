"""`loracli convert`: a LoHa / LoKr run -> a LoRA run that the verbs and PEFT take."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

from lora_cli import rundir as rd
from lora_cli.inference.loading import load_run
from tests.helpers import make_imagefolder
from tests.inference.runs_fixture import edit_adapter, folder_bytes, make_run
from tests.training._util import loracli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    images = make_imagefolder(root / "images")
    return {m: make_run(root, m, images, method=m, seed=3) for m in ("loha", "lokr", "lora")}


def _pixels(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("choice", [["--energy", "0.95"], ["--rank", "2"]])
def test_converted_run_loads_in_peft_within_the_reported_error(method, choice, runs, tmp_path, monkeypatch, capsys):
    from transformers import ViTForImageClassification

    out = tmp_path / f"{method}-lora"
    assert loracli(monkeypatch, "convert", runs[method], "--to", "lora", *choice, "--out", out) == 0
    assert "max relative error" in capsys.readouterr().err
    record = json.loads((out / "convert.json").read_text())
    assert record["from"] == method and 0 < record["max_relative_error"] < 1
    if choice[0] == "--rank":
        assert {layer["rank"] for layer in record["layers"].values()} == {2}

    source = load_run(runs[method], device="cpu").model
    converted = load_run(out, device="cpu").model
    assert converted.peft_config["default"].peft_type == "LORA"
    base = ViTForImageClassification.from_pretrained(out / rd.BASE_MODEL_DIR)
    theirs = peft.PeftModel.from_pretrained(base, out / rd.ADAPTER_DIR).eval()
    with torch.no_grad():
        reference = source(pixel_values=_pixels()).logits
        ours = converted(pixel_values=_pixels()).logits
        torch.testing.assert_close(theirs(pixel_values=_pixels()).logits, ours, atol=1e-5, rtol=1e-5)
        # a layer's error moves its output by at most that fraction of the adapter's contribution
        with source.disable_adapter():
            plain = source(pixel_values=_pixels()).logits
    adapter_effect = (reference - plain).norm()
    assert (ours - reference).norm() <= 3 * record["max_relative_error"] * adapter_effect + 1e-5

    assert loracli(monkeypatch, "eval", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 12


def test_refusals_write_nothing(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x"
    cases = [
        ([runs["lora"], "--rank", "2"], "LoRA already"),
        ([runs["loha"], "--rank", "2", "--energy", "0.9"], "exactly one"),
        ([runs["loha"]], "exactly one"),
        ([runs["loha"], "--energy", "1.5"], "energy is the fraction"),
        ([runs["loha"], "--rank", "2", "--to", "loha"], "convert to lora only"),
    ]
    for args, match in cases:
        assert loracli(monkeypatch, "convert", *args, "--out", out) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()
    before = folder_bytes(runs["loha"])
    assert loracli(monkeypatch, "convert", runs["loha"], "--rank", "2", "--out", runs["loha"], "--overwrite") == 2
    assert "which this command reads" in capsys.readouterr().err
    assert folder_bytes(runs["loha"]) == before


def test_a_run_whose_factors_hold_nan_is_refused_before_any_svd(runs, tmp_path, monkeypatch, capsys):
    """Before: the SVD failed to converge ("internal error"). Now: exit 2 naming the file and the tensor."""
    source = tmp_path / "nan"
    shutil.copytree(runs["loha"], source)
    edit_adapter(source, lambda key, t: t.fill_(float("nan")) if key.endswith("0.attention.q_proj.hada_w1_a") else t)
    out = tmp_path / "out"
    assert loracli(monkeypatch, "convert", source, "--energy", "0.99", "--out", out) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and "vit.layers.0.attention.q_proj.hada_w1_a holds 128 NaN" in err
    assert "internal error" not in err and not out.exists()


def test_a_delta_that_overflows_float32_is_refused_naming_the_layer(runs, tmp_path, monkeypatch, capsys):
    """Finite factors whose Hadamard product overflows: exit 1 naming the layer, before the SVD, nothing written."""
    source = tmp_path / "huge"
    shutil.copytree(runs["loha"], source)
    edit_adapter(source, lambda key, t: t * 1e12 if ".hada_" in key else t)
    out = tmp_path / "out"
    assert loracli(monkeypatch, "convert", source, "--rank", "2", "--out", out) == 1
    err = capsys.readouterr().err
    assert "loha delta weight came out non-finite: vit.layers.0.attention.q_proj holds" in err
    assert "internal error" not in err and not out.exists()


def test_convert_says_the_ranks_and_sizes_and_warns_when_the_adapter_grew(runs, tmp_path, monkeypatch, capsys):
    from lora_cli.evaluation.compare import format_bytes

    def size(run):
        return (run / rd.ADAPTER_DIR / "adapter_model.safetensors").stat().st_size

    out = tmp_path / "grown"
    assert loracli(monkeypatch, "convert", runs["loha"], "--energy", "0.9999", "--out", out) == 0
    err = capsys.readouterr().err
    ranks = sorted({layer["rank"] for layer in json.loads((out / "convert.json").read_text())["layers"].values()})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    assert size(out) > size(runs["loha"]) and ranks[-1] > 4
    assert f"adapter: loha r=4, {format_bytes(size(runs['loha']))} -> lora rank {shown}, {format_bytes(size(out))}" in err
    assert "warning: the LoRA adapter is larger than the loha one" in err and "--rank" in err, err

    out = tmp_path / "smaller"
    assert loracli(monkeypatch, "convert", runs["loha"], "--rank", "1", "--out", out) == 0
    err = capsys.readouterr().err
    assert size(out) < size(runs["loha"])
    assert f"-> lora rank 1, {format_bytes(size(out))}" in err and "larger" not in err, err
