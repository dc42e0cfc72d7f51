from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.inference.merge import (
    MergeVerificationError,
    compare_logits,
    merge_run,
    synthetic_inputs,
)
from tests.inference.conftest import ID2LABEL, METHODS, make_adapter_model


def _pixels(processor, n=6):
    return synthetic_inputs(make_adapter_model().base_model, processor, n=n, seed=3)


CASES = [pytest.param(m, {}, id=m) for m in METHODS] + [
    pytest.param("lora", {"use_dora": True}, id="dora"),
    pytest.param("lora", {"use_rslora": True}, id="rslora"),
]


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_merged_logits_equal_adapter_logits(method, extra, processor, tmp_path):
    from transformers import AutoModelForImageClassification

    model = make_adapter_model(method, **extra)
    pixels = _pixels(processor)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        with model.disable_adapter():  # the adapter must matter, or the check proves nothing
            plain = model(pixel_values=pixels).logits
    assert (expected - plain).abs().max() > 1e-2
    report = merge_run(model, processor, tmp_path / "merged", verify_batch=pixels, id2label=ID2LABEL)
    assert report.inputs == "validation" and report.num_inputs == 6 and report.top1_agreement == 1.0
    assert report.max_abs_diff <= 1e-4

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = reloaded(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert reloaded.config.id2label == ID2LABEL
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_merge_within_documented_tolerance(dtype, processor, tmp_path):
    report = merge_run(make_adapter_model(), processor, tmp_path / "m", dtype=dtype, n=4)
    assert report.inputs == "synthetic" and report.num_inputs == 4
    assert report.max_abs_diff <= report.tolerance
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype


def test_merge_refuses_when_verification_fails_and_writes_nothing(processor, tmp_path):
    model = make_adapter_model()
    _, layer = next(model.adapter_layers())
    real_merge = layer.merge_one

    def corrupt_merge(name, safe_merge):  # a merge bug: the delta lands twice
        real_merge(name, safe_merge)
        real_merge(name, safe_merge)

    layer.merge_one = corrupt_merge
    with pytest.raises(MergeVerificationError, match="does not reproduce the adapter model.*nothing written"):
        merge_run(model, processor, tmp_path / "out", n=4)
    assert list(tmp_path.iterdir()) == []  # no target, no temp dir left beside it


def test_non_finite_merge_is_refused(processor, tmp_path):
    model = make_adapter_model()
    _, layer = next(model.adapter_layers())
    real_delta = layer.get_delta_weight
    layer.get_delta_weight = lambda name: real_delta(name) * float("inf")
    with pytest.raises(LoraCliError, match="NaN/inf"):
        merge_run(model, processor, tmp_path / "out", n=2)
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_no_partial_dir(processor, tmp_path, monkeypatch):
    model = make_adapter_model()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(processor), "save_pretrained", broken_save)
    with pytest.raises(LoraCliError, match="could not write .*out \\(disk full\\); nothing half-written"):
        merge_run(model, processor, tmp_path / "out", n=2)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_needs_force(processor, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserInputError, match="not empty; pick a new folder.*or pass --force"):
        merge_run(make_adapter_model(), processor, out, n=2)
    assert (out / "keep.txt").is_file()
    with pytest.raises(UserInputError, match="--force replaces only a folder an earlier `loracli merge` wrote"):
        merge_run(make_adapter_model(), processor, out, n=2, force=True)  # user files, not a model
    (out / "config.json").write_text("{}")  # a model folder, but not one merge wrote
    with pytest.raises(UserInputError, match=r"it holds merge\.json"):
        merge_run(make_adapter_model(), processor, out, n=2, force=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "merge.json").write_text("{}")  # a folder an earlier merge wrote
    merge_run(make_adapter_model(), processor, out, n=2, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "merge.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserInputError, match="--dtype 'int8' is not supported"):
        merge_run(make_adapter_model(), processor, tmp_path / "x", dtype="int8")


def test_compare_logits_tolerates_only_near_ties():
    ref = torch.tensor([[1.0, 0.99995, -3.0], [2.0, 0.0, 0.0]])
    swapped = torch.tensor([[0.99996, 1.0, -3.0], [2.0, 0.0, 0.0]])  # a near-tie flip
    assert compare_logits(ref, swapped, "float32")[3]
    far = torch.tensor([[0.0, 1.0, -3.0], [2.0, 0.0, 0.0]])
    assert not compare_logits(ref, far, "float32")[3]


BLOCKER = textwrap.dedent(
    """
    import sys
    # A None entry makes `import peft` fail and importlib.util.find_spec("peft") return None,
    # which is how transformers probes for optional packages: both look "not installed".
    sys.modules["lora_cli"] = None
    sys.modules["peft"] = None
    sys.path = [p for p in sys.path if p not in ("", ".", {project!r})]
    for mod in ("lora_cli", "peft"):
        try:
            __import__(mod)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{mod}} is importable")
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained({out!r}).eval()
    processor = AutoImageProcessor.from_pretrained({out!r})
    pixels = torch.load({pixels!r})
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    expected = torch.load({expected!r})
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert model.config.id2label[1] == "churros", model.config.id2label
    print("ok", type(processor).__name__)
    """
)


@pytest.mark.slow  # a fresh interpreter importing transformers: ~20-60 s on a busy machine
def test_merged_dir_loads_without_loracli_or_peft(processor, tmp_path):
    from pathlib import Path

    model = make_adapter_model()
    pixels = _pixels(processor, n=3)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    merge_run(model, processor, tmp_path / "merged", verify_batch=pixels)
    torch.save(pixels, tmp_path / "pixels.pt")
    torch.save(expected, tmp_path / "expected.pt")
    project = str(Path(__file__).resolve().parents[2])
    code = BLOCKER.format(
        project=project, out=str(tmp_path / "merged"), pixels=str(tmp_path / "pixels.pt"),
        expected=str(tmp_path / "expected.pt"),
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok ViTImageProcessor")
