"""seq-cls: labels, metrics, and the head that must come back after a reload (else: chance accuracy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.recipe import load_recipe
from lora_cli.tasks import seq_cls
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    assert_merge_and_peft_agree,
    eval_batch,
    logits_of,
    make_tokenizer,
    require_method,
    sentiment_rows,
    write_csv,
    write_recipe,
)


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bert", template="bert")


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "plain")


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory, bert_tok):
    """A 'pretrained' encoder folder without any classification head, like a sentence encoder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert") / "model"
    cfg = {k: v for k, v in TINY_CONFIGS["bert"].items() if k != "model_type"}
    tok = AutoTokenizer.from_pretrained(bert_tok)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _data(tmp_path, **extra):
    write_csv(tmp_path / "train.csv", sentiment_rows(48))
    return {"train_file": str(tmp_path / "train.csv"), "val_split": 0.25, "max_length": 16, **extra}


class KeepLogits(TrainerCallback):
    """Logits of the in-memory model at the end of training, on a fixed batch."""

    def __init__(self, batch):
        self.batch, self.logits = batch, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was = model.training
        model.eval()
        self.logits = logits_of(model, self.batch)
        model.train(was)


# ------------------------------------------------------------------ units
def test_labels_become_class_names_and_metrics_are_accuracy_and_macro_f1(tmp_path, bert_tok):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", task="seq-cls",
                                      model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert_tok)},
                                      data=_data(tmp_path, text_pair_column="pair")))
    splits, labels = seq_cls.load_raw(recipe.data, recipe.seed)
    assert labels == ["neg", "pos"]
    tok = seq_cls.load_processor(recipe.model)
    train, _ = seq_cls.prepare(splits, tok, recipe.data, recipe.seed)
    row = train[0]
    assert set(row) == {"input_ids", "token_type_ids", "labels"} and row["labels"] in (0, 1)
    assert row["input_ids"][0] == tok.cls_token_id and 1 in row["token_type_ids"]  # the pair is encoded

    class Pred:
        predictions = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
        label_ids = np.array([0, 1, 1, 0])

    metrics = seq_cls.compute_metrics(Pred)
    assert metrics["accuracy"] == 0.75
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_missing_label_column_is_named(tmp_path, bert_tok):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", task="seq-cls",
                                      model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert_tok)},
                                      data=_data(tmp_path, label_column="sentiment")))
    with pytest.raises(UserInputError, match="data.label_column: the data has no column 'sentiment'"):
        seq_cls.load_raw(recipe.data, recipe.seed)


# ----------------------------------------------------------- end to end
def test_pretrained_encoder_head_is_saved_and_reload_predicts_the_same(tmp_path, pretrained_bert):
    """The classic pitfall: a new head not saved -> a fresh random head after reload."""
    recipe_path = write_recipe(tmp_path / "r.yaml", task="seq-cls", model={"name_or_path": str(pretrained_bert)},
                               data=_data(tmp_path), adapter={"target_modules": ["query", "key", "value", "dense"]},
                               training={"max_steps": 12, "learning_rate": 2e-2})
    recipe = load_recipe(recipe_path)
    tok = seq_cls.load_processor(recipe.model)
    texts = [r["text"] for r in sentiment_rows(8)]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    keep = KeepLogits(batch)
    run_dir = run_training(recipe_path, extra_callbacks=[keep])

    assert not (run_dir / "base_model").exists()  # the base comes from name_or_path again
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"

    run = load_run(run_dir, device="cpu")
    torch.testing.assert_close(logits_of(run.model, batch), keep.logits, atol=1e-5, rtol=1e-5)
    fresh = seq_cls.build_model(run.recipe.model, ["neg", "pos"])  # what a reload without the head would use
    assert not torch.allclose(fresh.classifier.weight, run.model.get_base_model().classifier.weight)

    report = json.loads((run_dir / "eval.json").read_text())
    metrics = report.get("trainer", report)  # the Trainer's metrics, inside the full report when there is one
    assert 0 <= metrics["eval_f1_macro"] <= 1 and metrics["eval_accuracy"] > 0
    ds = seq_cls.eval_dataset(run.recipe.data, run.recipe.seed, run.processor)
    eval_b = seq_cls.make_collator(run.processor)([ds[i] for i in range(len(ds))])
    preds = logits_of(run.model, eval_b).argmax(-1)
    assert float((preds == eval_b["labels"]).float().mean()) == pytest.approx(metrics["eval_accuracy"])

    texts = ["the meal was great", "the day was awful", "the song was nice"]
    expected = [run.id2label[int(i)] for i in logits_of(run.model, dict(tok(texts, padding=True, return_tensors="pt"))).argmax(-1)]
    top = seq_cls.classify_text(run, texts[0], top_k=2)
    assert top[0]["label"] == expected[0] and {t["label"] for t in top} == {"pos", "neg"}
    assert top[0]["score"] >= top[1]["score"] and sum(t["score"] for t in top) == pytest.approx(1.0)
    assert [r[0]["label"] for r in seq_cls.classify_text(load_run(run_dir), texts, top_k=1)] == expected


@pytest.mark.parametrize("model_type, method, tok", [("gpt2", "adalora", "plain"), ("bert", "lokr", "bert")])
def test_config_model_trains_merges_and_loads_in_peft(tmp_path, request, model_type, method, tok):
    from transformers import AutoModelForSequenceClassification

    require_method(method)
    tok_dir = request.getfixturevalue(f"{tok}_tok")
    target = ["c_attn"] if model_type == "gpt2" else ["query", "value"]
    run_dir = run_training(write_recipe(
        tmp_path / "r.yaml", task="seq-cls", model={"config": TINY_CONFIGS[model_type], "tokenizer": str(tok_dir)},
        data=_data(tmp_path, text_pair_column="pair"), method=method, adapter={"target_modules": target},
        training={"max_steps": 6, "learning_rate": 2e-2}))
    run = load_run(run_dir, device="cpu")
    head = "score" if model_type == "gpt2" else "classifier"
    assert run.model.peft_config["default"].modules_to_save == [head]
    batch = eval_batch(run)
    ours = assert_merge_and_peft_agree(run, AutoModelForSequenceClassification, batch)
    assert ours.shape == (batch["input_ids"].shape[0], 2)
    assert len(seq_cls.classify_text(run, "the day was bad", top_k=5)) == 2
