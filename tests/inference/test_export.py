"""`loracli export --format onnx`: verified merge, torch.onnx export, ONNX Runtime check, nothing written on failure."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lora_cli.errors import UserInputError
from lora_cli.inference import export as export_mod
from lora_cli.inference.export import ExportVerificationError, export_run
from lora_cli.inference.loading import load_run
from lora_cli.inference.merge import verification_batch
from tests.inference.runs_fixture import folder_bytes, make_run
from tests.inference.trained_runs import train_quickstart, train_text_classifier


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return train_quickstart(tmp_path_factory.mktemp("qs"))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return train_text_classifier(tmp_path_factory.mktemp("text"))


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def onnx_logits(folder, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return session.run(["logits"], feed)[0]


def adapter_logits(run_dir, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    model = load_run(run_dir, device="cpu").model
    with torch.no_grad():
        return model(**inputs).logits.numpy()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_quickstart_exports_and_onnx_runtime_matches_the_adapter_model(quickstart, tmp_path, exporter):
    out = tmp_path / "onnx"
    report = export_run(quickstart, out, exporter=exporter, n=8)
    assert report.exporter == exporter and report.inputs == "validation" and report.num_inputs == 8
    assert report.max_abs_diff <= report.tolerance and report.top1_agreement == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.onnx",
                                                      "preprocessor_config.json"]
    assert json.loads((out / "config.json").read_text())["id2label"]["3"] == "3"
    assert json.loads((out / "export.json").read_text())["exporter"] == exporter
    # another batch size than the export's: the batch axis is dynamic
    loaded = load_run(quickstart, device="cpu")
    pixels = {"pixel_values": verification_batch(loaded, 11)[0]["pixel_values"]}
    np.testing.assert_allclose(onnx_logits(out, pixels), adapter_logits(quickstart, pixels), atol=1e-4, rtol=1e-4)
    assert not any(p.name.startswith(".onnx") for p in tmp_path.iterdir())  # no staging folder left


def test_text_classifier_exports_with_dynamic_batch_and_sequence(text_run, tmp_path):
    out = tmp_path / "onnx"
    report = export_run(text_run, out)
    assert report.exporter == "dynamo" and set(report.input_names) >= {"input_ids", "attention_mask"}
    assert (out / "tokenizer.json").is_file() and (out / "model.onnx").is_file()
    loaded = load_run(text_run, device="cpu")
    batch = loaded.processor(["the film was very good", "bad"], padding=True, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in report.input_names}
    assert inputs["input_ids"].shape[1] != 16  # not the export's sequence length
    np.testing.assert_allclose(onnx_logits(out, inputs), adapter_logits(text_run, inputs), atol=1e-4, rtol=1e-4)


def test_an_export_that_onnx_runtime_does_not_reproduce_writes_nothing(monkeypatch, tmp_path, imagefolder):
    run = make_run(tmp_path, "run", imagefolder)
    real_export = export_mod.export_onnx

    def wrong_export(model, inputs, path, **kwargs):  # an exporter bug: the head's bias shifts
        with torch.no_grad():
            model.classifier.bias += 1.0
        try:
            return real_export(model, inputs, path, **kwargs)
        finally:
            with torch.no_grad():
                model.classifier.bias -= 1.0

    monkeypatch.setattr(export_mod, "export_onnx", wrong_export)
    before = folder_bytes(run)
    with pytest.raises(ExportVerificationError, match="ONNX Runtime does not reproduce.*nothing written"):
        export_run(run, tmp_path / "onnx", n=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "run"]  # no output, no staging folder
    assert folder_bytes(run) == before


def test_cli_export_default_out_and_refusals(monkeypatch, capsys, tmp_path, imagefolder):
    run = make_run(tmp_path, "run", imagefolder)
    code, err = cli(monkeypatch, capsys, "export", run, "--n", "4")
    assert code == 0, err
    assert "verified in ONNX Runtime" in err and (tmp_path / "run-onnx" / "model.onnx").is_file()
    # a second export into the same folder needs --force, which replaces only an earlier export
    code, err = cli(monkeypatch, capsys, "export", run, "--n", "4")
    assert code == 2 and "exists and is not empty" in err
    assert cli(monkeypatch, capsys, "export", run, "--n", "4", "--force")[0] == 0
    before = folder_bytes(run)
    code, err = cli(monkeypatch, capsys, "export", run, "--out", run / "adapter")
    assert code == 2 and "the run's own adapter" in err
    code, err = cli(monkeypatch, capsys, "export", run, "--out", run)
    assert code == 2 and "is the run" in err and "would destroy it" in err
    code, err = cli(monkeypatch, capsys, "export", run, "--format", "tflite", "--out", tmp_path / "x")
    assert code == 2 and "--format 'tflite' is not supported" in err
    assert folder_bytes(run) == before and not (tmp_path / "x").exists()


def test_generative_runs_are_refused_before_loading(tmp_path):
    from tests.helpers_text import (
        TINY_CONFIGS,
        make_tokenizer,
        prompt_rows,
        write_jsonl,
        write_recipe,
    )

    tok = make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    recipe = write_recipe(tmp_path / "recipe.yaml", task="causal-lm",
                          model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok)},
                          data={"train_file": str(tmp_path / "train.jsonl")})
    run = tmp_path / "lm-run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.read_text())
    with pytest.raises(UserInputError, match="is a causal-lm run; ONNX export covers image-classification and seq-cls"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_onnx_runtime_names_the_install(monkeypatch, tmp_path, imagefolder):
    import importlib.util

    run = make_run(tmp_path, "run", imagefolder)
    real = importlib.util.find_spec
    gone = {"onnxruntime", "onnxscript"}  # the dynamo exporter needs onnxscript too
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    with pytest.raises(UserInputError, match=r"needs onnxruntime, onnxscript: install the export extra: "
                                             r"pip install 'loracli\[export\]'"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
