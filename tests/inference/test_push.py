"""`loracli push`: the folder (PEFT layout, card, recipe, plots), the model card's metadata, offline refusal."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lora_cli.inference import push as push_mod
from lora_cli.inference.loading import load_run
from lora_cli.inference.model_card import md_text, validate_card
from lora_cli.inference.push import push_run
from tests.inference.runs_fixture import folder_bytes, make_run
from tests.inference.trained_runs import train_quickstart, train_text_classifier


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return train_quickstart(tmp_path_factory.mktemp("qs"))


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def load_card(folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    return card, card.data.to_dict()


def test_dry_run_writes_a_peft_adapter_repo_with_a_valid_card(quickstart, tmp_path):
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    out = tmp_path / "to-push"
    result = push_run(quickstart, "me/quickstart-lora", dry_run=out)
    files = set(result["files"])
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "label_map.json", "recipe.yaml",
            "eval.json", "preprocessor_config.json", "base_model/config.json", "plots/loss.png",
            "plots/confusion_matrix.png"} <= files
    card, meta = load_card(out)
    validate_card(str(card))
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-classification"
    assert {"loracli", "lora", "peft"} <= set(meta["tags"]) and "base_model" not in meta  # built from a config
    assert meta["loracli"]["method"] == "lora" and meta["loracli"]["settings"]["r"] == 16
    name, results = model_index_to_eval_results(meta["model-index"])
    accuracy = json.loads((quickstart / "eval.json").read_text())["accuracy"]
    assert name == "quickstart-lora"
    assert {r.metric_type: r.metric_value for r in results}["accuracy"] == pytest.approx(accuracy)
    assert "![loss.png](plots/loss.png)" in card.text and "PeftModel.from_pretrained(base, 'me/quickstart-lora')" in card.text
    # PEFT loads the folder as the Hub would serve it, and predicts what loracli's run predicts
    base = AutoModelForImageClassification.from_pretrained(out / "base_model")
    theirs = PeftModel.from_pretrained(base, out).eval()
    ours = load_run(quickstart, device="cpu").model
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixels).logits, ours(pixel_values=pixels).logits)


def test_merged_dry_run_is_a_plain_transformers_repo(quickstart, tmp_path):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "merged"
    push_run(quickstart, "me/quickstart", merged=True, dry_run=out, base_model="google/vit-base-patch16-224")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    _, meta = load_card(out)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "google/vit-base-patch16-224"
    merged = AutoModelForImageClassification.from_pretrained(out).eval()
    ours = load_run(quickstart, device="cpu").model
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, ours(pixel_values=pixels).logits,
                                   atol=1e-4, rtol=1e-4)


def test_text_classifier_card(tmp_path):
    run = train_text_classifier(tmp_path)
    out = tmp_path / "push"
    push_run(run, "me/sentiment", dry_run=out)
    assert (out / "tokenizer.json").is_file() and (out / "adapter_model.safetensors").is_file()
    _, meta = load_card(out)
    assert meta["pipeline_tag"] == "text-classification"
    assert {r["metrics"][0]["type"] for r in meta["model-index"][0]["results"]} >= {"accuracy"}


def test_hostile_labels_and_paths_stay_text(tmp_path, imagefolder):
    from lora_cli.inference.evaluate import eval_run
    from tests.helpers import make_imagefolder

    classes = ("<img src=x onerror=alert(1)>", "*bold* [x](y)", "a: b # c | d")
    images = make_imagefolder(tmp_path / "imgs: - [x] #", classes=classes)
    run = make_run(tmp_path, "run", images, classes=classes)
    eval_run(run, device="cpu")
    out = tmp_path / "push"
    push_run(run, "me/hostile", dry_run=out)
    card, meta = load_card(out)
    validate_card(str(card))
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "local data (imgs: - [x] #)"
    assert "<img" not in card.text and "&lt;img src=x onerror=alert(1)&gt;" in card.text
    assert md_text(classes[0]) in card.text and md_text(classes[1]) == r"\*bold\* \[x\](y)"
    assert r"a: b # c \| d" in card.text


def test_offline_push_fails_at_once_and_sends_nothing(monkeypatch, capsys, tmp_path, imagefolder):
    calls = []
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", lambda *a, **k: calls.append(a))
    run = make_run(tmp_path, "run", imagefolder)
    before = folder_bytes(run)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli(monkeypatch, capsys, "push", run, "me/x")
    assert code == 2 and "offline mode is set" in err and "--dry-run" in err
    # not offline by setting, but no network: one refused connect, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    push_mod.hub_reachable.cache_clear()
    try:
        code, err = cli(monkeypatch, capsys, "push", run, "me/x")
    finally:
        push_mod.hub_reachable.cache_clear()
    assert code == 2 and "unreachable" in err
    assert calls == [] and folder_bytes(run) == before


def test_upload_sends_the_dry_run_folder(monkeypatch, tmp_path, imagefolder):
    run = make_run(tmp_path, "run", imagefolder)
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            sent["repo"] = (repo_id, private, exist_ok)

        def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
            sent["branch"] = branch

        def upload_folder(self, repo_id, folder_path, revision=None, repo_type=None, commit_message=None):
            sent["files"] = folder_bytes(folder_path)
            sent["revision"] = revision

    monkeypatch.setattr(push_mod, "offline_by_env", lambda: False)
    monkeypatch.setattr(push_mod, "hub_reachable", lambda: True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    push_run(run, "me/run", private=True, revision="v1")
    push_run(run, "me/run", dry_run=tmp_path / "dry")
    assert sent["repo"] == ("me/run", True, True) and sent["branch"] == "v1" and sent["revision"] == "v1"
    assert sent["token"] == "hf_test" and sent["files"] == folder_bytes(tmp_path / "dry")


def test_bad_input_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path, imagefolder):
    run = make_run(tmp_path, "run", imagefolder)
    code, err = cli(monkeypatch, capsys, "push", run, "me/bad name", "--dry-run", tmp_path / "a")
    assert code == 2 and "is not a Hub repository id" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, err = cli(monkeypatch, capsys, "push", run, "me/x", "--dry-run", tmp_path / "full")
    assert code == 2 and "not empty" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, err = cli(monkeypatch, capsys, "push", run, "me/x", "--dry-run", run / "plots")
    assert code == 2 and "inside the run" in err
    code, err = cli(monkeypatch, capsys, "push", tmp_path / "images", "me/x", "--dry-run", tmp_path / "b")
    assert code == 2 and "is not a finished run" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_dry_run_and_push_end_with_their_summary_line(monkeypatch, capsys, tmp_path, imagefolder):
    """Through the entry point: the summary line is printed and the exit code is 0 (a local named like
    the `shown` helper once turned both into "internal error", exit 1, after the work was done)."""
    run = make_run(tmp_path, "run", imagefolder)
    code, err = cli(monkeypatch, capsys, "push", run, "me/run", "--dry-run", tmp_path / "dry")
    assert code == 0, err
    assert "ok dry run: wrote" in err and "nothing uploaded" in err and "README.md" in err
    assert (tmp_path / "dry" / "adapter_config.json").is_file()

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            pass

        def upload_folder(self, repo_id, folder_path, revision=None, repo_type=None, commit_message=None):
            pass

    monkeypatch.setattr(push_mod, "offline_by_env", lambda: False)
    monkeypatch.setattr(push_mod, "hub_reachable", lambda: True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    code, err = cli(monkeypatch, capsys, "push", run, "me/run")
    assert code == 0, err
    assert "ok pushed" in err and "me/run" in err
