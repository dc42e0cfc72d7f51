"""`loracli eval`, `merge` and `predict --text/--prompt` on text runs, through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_cli.inference.loading import load_run
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    cli,
    logits_of,
    make_tokenizer,
    prompt_rows,
    sentiment_rows,
    translation_rows,
    write_csv,
    write_jsonl,
    write_recipe,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per text task."""
    root = tmp_path_factory.mktemp("text-runs")
    plain = make_tokenizer(root / "tok-plain")
    bert = make_tokenizer(root / "tok-bert", template="bert")
    out = {}

    lm = root / "lm"
    lm.mkdir()
    write_jsonl(lm / "train.jsonl", prompt_rows())
    out["causal-lm"] = run_training(write_recipe(
        lm / "recipe.yaml", task="causal-lm", model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(plain)},
        data={"train_file": str(lm / "train.jsonl"), "max_length": 32}))

    cls = root / "cls"
    cls.mkdir()
    write_csv(cls / "train.csv", sentiment_rows(48))
    out["seq-cls"] = run_training(write_recipe(
        cls / "recipe.yaml", task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert)},
        data={"train_file": str(cls / "train.csv"), "val_split": 0.25, "max_length": 16}))

    mt = root / "mt"
    mt.mkdir()
    write_jsonl(mt / "train.jsonl", translation_rows())
    out["seq2seq"] = run_training(write_recipe(
        mt / "recipe.yaml", task="seq2seq", model={"config": TINY_CONFIGS["t5"], "tokenizer": str(plain)},
        data={"train_file": str(mt / "train.jsonl"), "source_lang": "de", "target_lang": "en", "max_length": 32},
        adapter={"target_modules": ["q", "v"]}))
    return out


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
def test_eval_reports_loss_and_perplexity(monkeypatch, capsys, runs, task):
    code, out, err = cli(monkeypatch, capsys, "eval", str(runs[task]), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_tokens"] > 0 and report["loss"] > 0
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    if task == "seq2seq":
        assert 0 <= report["bleu"] <= 100
    assert json.loads((runs[task] / "eval.json").read_text())["loss"] == pytest.approx(report["loss"])


def test_eval_of_a_text_classifier_has_accuracy_and_confusion_matrix(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "eval", str(runs["seq-cls"]), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert 0 <= report["accuracy"] <= 1 and report["num_classes"] == 2
    assert (runs["seq-cls"] / "plots" / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.parametrize(
    "task, auto", [("causal-lm", "AutoModelForCausalLM"), ("seq-cls", "AutoModelForSequenceClassification"),
                   ("seq2seq", "AutoModelForSeq2SeqLM")])
def test_merge_writes_a_plain_transformers_folder_with_equal_logits(monkeypatch, capsys, tmp_path, runs, task, auto):
    import transformers

    out_dir = tmp_path / "merged"
    code, _, err = cli(monkeypatch, capsys, "merge", str(runs[task]), "--out", str(out_dir))
    assert code == 0, err
    assert "verified on" in err and "validation" in err
    run = load_run(runs[task], device="cpu")
    ds = run.task.eval_dataset(run.recipe.data, run.recipe.seed, run.processor, limit=4)
    batch = run.task.make_collator(run.processor, run.recipe.data)([ds[i] for i in range(len(ds))])
    merged = getattr(transformers, auto).from_pretrained(out_dir).eval()
    torch.testing.assert_close(logits_of(merged, batch), logits_of(run.model, batch), atol=1e-4, rtol=1e-4)
    assert (out_dir / "tokenizer_config.json").is_file()


def test_predict_text_and_prompt(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["seq-cls"]), "--text", "the film was good",
                         "--top-k", "2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["label"] for r in rows[0]["top_k"]] and sorted(r["label"] for r in rows[0]["top_k"]) == ["neg", "pos"]
    assert sum(r["score"] for r in rows[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)

    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["causal-lm"]), "--prompt", "the film was",
                         "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["text"] == "the film was" and isinstance(json.loads(out)[0]["generated"], str)

    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["seq2seq"]), "--text", "guten morgen",
                         "--max-new-tokens", "4")
    assert code == 0, err
    assert "guten morgen" in out


def test_predict_text_on_an_image_run_or_with_paths_is_bad_input(monkeypatch, capsys, runs, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "predict", "x.jpg", "--run", str(runs["seq-cls"]), "--text", "hi")
    assert code == 2 and "no image paths" in err
    code, _, err = cli(monkeypatch, capsys, "predict", "--text", "hi")
    assert code == 2 and "--run" in err


def test_image_paths_on_a_text_run_are_bad_input(monkeypatch, capsys, runs, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    code, _, err = cli(monkeypatch, capsys, "predict", str(image), "--run", str(runs["seq-cls"]))
    assert code == 2 and "is a seq-cls run" in err and "--text" in err


def test_a_damaged_processor_or_base_model_folder_is_named(monkeypatch, capsys, runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(runs["seq-cls"], run)
    (run / "base_model" / "config.json").write_text("{not json")
    code, _, err = cli(monkeypatch, capsys, "eval", str(run))
    assert code == 2 and "base_model: the run's base model cannot be read" in err
    shutil.copytree(runs["seq-cls"] / "base_model", run / "base_model", dirs_exist_ok=True)
    for file in (run / "processor").iterdir():
        if file.suffix == ".json":
            file.write_text("{not json")
    code, _, err = cli(monkeypatch, capsys, "eval", str(run))
    assert code == 2 and f"{run / 'processor'}" in err and "could not load a tokenizer" in err
