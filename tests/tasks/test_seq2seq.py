"""seq2seq: translation records and column pairs, -100 label padding, BLEU, merge and PEFT parity."""

from __future__ import annotations

import json

import pytest
import torch

from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.tasks import seq2seq
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    DE_EN,
    TINY_CONFIGS,
    assert_merge_and_peft_agree,
    eval_batch,
    make_tokenizer,
    require_method,
    translation_rows,
    write_csv,
    write_jsonl,
    write_recipe,
)

WMT = {"source_lang": "de", "target_lang": "en", "max_length": 32, "max_target_length": 16}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "t5", template="eos")


def _recipe(tmp_path, tok_dir, data, method="lora", adapter=None, training=None):
    write_jsonl(tmp_path / "train.jsonl", translation_rows())
    return write_recipe(tmp_path / "r.yaml", task="seq2seq",
                        model={"config": TINY_CONFIGS["t5"], "tokenizer": str(tok_dir)},
                        data={"train_file": str(tmp_path / "train.jsonl"), "val_split": 0.25, **data},
                        method=method, adapter=adapter, training=training)


def test_translation_records_get_the_prefix_and_labels_pad_with_minus_100(tmp_path, tok_dir):
    recipe = load_recipe(_recipe(tmp_path, tok_dir, WMT))
    assert seq2seq.source_prefix(recipe.data) == "translate German to English: "
    tok = seq2seq.load_processor(recipe.model)
    splits, labels = seq2seq.load_raw(recipe.data, recipe.seed)
    assert labels is None
    train, _ = seq2seq.prepare(splits, tok, recipe.data, recipe.seed)
    rows = [train[i] for i in range(4)]
    first = tok.decode(rows[0]["input_ids"], skip_special_tokens=True)
    assert first.startswith("translate german to english: ")  # the tokenizer lower-cases
    batch = seq2seq.make_collator(tok, recipe.data)(rows)
    for i, row in enumerate(rows):
        n = len(row["labels"])
        assert batch["labels"][i, :n].tolist() == row["labels"] and row["labels"][-1] == tok.eos_token_id
        assert (batch["labels"][i, n:] == -100).all()
        m = len(row["input_ids"])
        assert (batch["input_ids"][i, m:] == tok.pad_token_id).all() and batch["attention_mask"][i, m:].sum() == 0


def test_column_pairs_and_custom_prefix(tmp_path, tok_dir):
    write_csv(tmp_path / "pairs.csv", [{"de": de, "en": en} for de, en in DE_EN])
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", task="seq2seq", model={"config": TINY_CONFIGS["t5"], "tokenizer": str(tok_dir)},
        data={"train_file": str(tmp_path / "pairs.csv"), "source_column": "de", "target_column": "en",
              "source_prefix": "to english: ", "max_target_length": 2}))
    tok = seq2seq.load_processor(recipe.model)
    splits, _ = seq2seq.load_raw(recipe.data, recipe.seed)
    assert seq2seq.pairs(splits.train[0], recipe.data) in DE_EN
    train, _ = seq2seq.prepare(splits, tok, recipe.data, recipe.seed)
    assert max(len(r["labels"]) for r in train) == 2  # max_target_length truncates targets


@pytest.mark.parametrize("data, match", [
    ({"source_column": "de"}, r"r\.yaml:\d+: data\.source_column: needs data\.target_column too: they go together"),
    ({}, r"r\.yaml:\d+: data: seq2seq needs data\.source_column"),
])
def test_bad_data_sections_are_recipe_errors(tmp_path, tok_dir, data, match):
    """Column rules are checked when the recipe loads, at the recipe's line, before any data."""
    with pytest.raises(RecipeError, match=match):
        load_recipe(_recipe(tmp_path, tok_dir, data))


def test_a_translation_record_without_the_language_fails_clearly(tmp_path, tok_dir):
    recipe = load_recipe(_recipe(tmp_path, tok_dir, {"source_lang": "de", "target_lang": "fr"}))
    with pytest.raises(UserInputError, match="has no 'fr'"):
        seq2seq.eval_dataset(recipe.data, recipe.seed, seq2seq.load_processor(recipe.model))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_train_eval_bleu_merge_peft_generate(tmp_path, tok_dir, method):
    from transformers import AutoModelForSeq2SeqLM

    require_method(method)
    run_dir = run_training(_recipe(tmp_path, tok_dir, WMT, method, adapter={"target_modules": ["q", "k", "v", "o"]},
                                   training={"max_steps": 4, "learning_rate": 2e-2}))
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_token_accuracy"] <= 1
    assert 0 <= metrics["eval_bleu"] <= 100 and metrics["eval_bleu_rows"] == 9

    run = load_run(run_dir, device="cpu")
    assert run.model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert_merge_and_peft_agree(run, AutoModelForSeq2SeqLM, eval_batch(run))

    out = seq2seq.generate(run, "hallo welt", max_new_tokens=4)
    assert isinstance(out, str) and out == seq2seq.generate(load_run(run_dir), ["hallo welt"], max_new_tokens=4)[0]
    assert seq2seq.evaluate_bleu(run, limit=3)["bleu_rows"] == 3


@pytest.mark.slow
def test_translation_is_learnt(tmp_path, tok_dir):
    run_dir = run_training(_recipe(tmp_path, tok_dir, {**WMT, "val_split": 0.1}, adapter={"target_modules": "all-linear", "r": 16},
                                   training={"max_steps": 120, "learning_rate": 1e-2, "logging_steps": 40,
                                             "per_device_train_batch_size": 32}))
    run = load_run(run_dir, device="cpu")
    assert seq2seq.evaluate_bleu(run, split="train", limit=20)["bleu"] > 50
    with torch.no_grad():
        assert seq2seq.generate(run, "guten morgen", max_new_tokens=4) == "good morning"
