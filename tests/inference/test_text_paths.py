"""The text paths end to end: a T5 with a BERT tokenizer, chrF and eval_predictions.jsonl, chat runs
answering through their template and stopping at its end of turn, `predict --model MERGED` for every
text task, `tune` with overrides."""

from __future__ import annotations

import json

import pytest
import torch

from lora_cli.inference.loading import load_run
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    GPT2_CHAT_TEMPLATE,
    TINY_CONFIGS,
    chat_rows,
    cli,
    make_gpt2_tokenizer,
    make_tokenizer,
    sentiment_rows,
    translation_rows,
    write_csv,
    write_jsonl,
    write_recipe,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A T5 trained with a BERT-style tokenizer (token_type_ids), a chat GPT-2, a BERT classifier."""
    root = tmp_path_factory.mktemp("text-paths")
    bert = make_tokenizer(root / "tok-bert", template="bert")
    gpt2 = make_gpt2_tokenizer(root / "tok-gpt2")
    out = {}
    mt = root / "mt"
    write_jsonl(mt / "train.jsonl", translation_rows())
    out["seq2seq"] = run_training(write_recipe(
        mt / "recipe.yaml", task="seq2seq", model={"config": TINY_CONFIGS["t5"], "tokenizer": str(bert)},
        data={"train_file": str(mt / "train.jsonl"), "source_lang": "de", "target_lang": "en", "max_length": 32},
        adapter={"target_modules": ["q", "v"]}))
    lm = root / "chat"
    write_jsonl(lm / "train.jsonl", chat_rows(24))
    out["causal-lm"] = run_training(write_recipe(
        lm / "recipe.yaml", task="causal-lm", model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(gpt2)},
        data={"train_file": str(lm / "train.jsonl"), "format": "messages", "chat_template": GPT2_CHAT_TEMPLATE,
              "system_prompt": "be brief.", "max_length": 64}))
    cls = root / "cls"
    write_csv(cls / "train.csv", sentiment_rows(48))
    out["seq-cls"] = run_training(write_recipe(
        cls / "recipe.yaml", task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert)},
        data={"train_file": str(cls / "train.csv"), "val_split": 0.25, "max_length": 16}))
    return out


def test_t5_with_a_bert_tokenizer_finishes_with_bleu_chrf_and_predictions(runs, monkeypatch, capsys):
    run = runs["seq2seq"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the end-of-training generation ran
    report = json.loads((run / "eval.json").read_text())
    assert 0 <= report["eval_bleu"] <= 100 and 0 <= report["eval_chrf"] <= 100
    rows = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report["eval_bleu_rows"] and set(rows[0]) == {"input", "reference", "prediction"}
    code, out, err = cli(monkeypatch, capsys, "eval", str(run), "--json", "--limit", "3")
    assert code == 0, err
    assert "chrf" in json.loads(out) and "eval_predictions.jsonl" in err
    rows = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reference"] for r in rows)


def test_chat_run_prompts_through_its_template_and_stops_at_its_end_of_turn(runs, monkeypatch):
    loaded = load_run(runs["causal-lm"], device="cpu")
    tok = loaded.processor
    assert tok.chat_template == GPT2_CHAT_TEMPLATE  # the run's saved tokenizer keeps the recipe's template
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        reply = tok(" Lima.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return torch.cat([kwargs["input_ids"], torch.tensor([reply])], dim=1)

    monkeypatch.setattr(loaded.model, "generate", fake_generate)
    assert loaded.task.generate(loaded, "capital of Peru?", max_new_tokens=8) == " Lima."  # leaves the prompt whole
    prompt = tok.decode(seen["input_ids"][0])
    assert prompt == "system: be brief.\nuser: capital of Peru?\nassistant:"
    assert seen["eos_token_id"] == [tok.eos_token_id] and "token_type_ids" not in seen


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls", "seq2seq"])
def test_predict_with_a_merged_model_answers_as_the_run(runs, task, tmp_path, monkeypatch, capsys):
    merged = tmp_path / "merged"
    code, _, err = cli(monkeypatch, capsys, "merge", str(runs[task]), "--out", str(merged))
    assert code == 0, err
    record = json.loads((merged / "loracli.json").read_text())
    assert record["task"] == task
    option = "--prompt" if task == "causal-lm" else "--text"
    text = {"causal-lm": "capital of Peru?", "seq-cls": "the film was good", "seq2seq": "guten morgen"}[task]
    answers = []
    for source in (["--run", str(runs[task])], ["--model", str(merged)]):
        code, out, err = cli(monkeypatch, capsys, "predict", *source, option, text, "--max-new-tokens", "6", "--json")
        assert code == 0, err
        answers.append(json.loads(out)[0])
    if task == "seq-cls":
        assert [r["label"] for r in answers[0]["top_k"]] == [r["label"] for r in answers[1]["top_k"]]
        assert answers[0]["top_k"][0]["score"] == pytest.approx(answers[1]["top_k"][0]["score"], abs=1e-4)
    else:
        assert answers[0] == answers[1]
    if task == "causal-lm":
        from transformers import GenerationConfig

        assert GenerationConfig.from_pretrained(merged).eos_token_id == [0]  # the template's end of turn


def test_tune_takes_overrides_like_train(tmp_path, monkeypatch):
    from lora_cli.training import tune as tune_mod

    tok = make_tokenizer(tmp_path / "tok", template="bert")
    write_csv(tmp_path / "train.csv", sentiment_rows(24))
    recipe = write_recipe(tmp_path / "recipe.yaml", task="seq-cls",
                          model={"config": TINY_CONFIGS["bert"], "tokenizer": str(tok)},
                          data={"train_file": str(tmp_path / "train.csv"), "val_split": 0.25, "max_length": 16})
    seen = []
    monkeypatch.setattr(tune_mod, "run_training", lambda path, overrides, **kw: seen.append(overrides))
    with pytest.raises(Exception):  # noqa: B017 - the fake training writes no metrics: only the overrides matter
        tune_mod.tune(recipe, ["training.learning_rate=float(1e-4,1e-2,log)"], 1, "eval_accuracy",
                      out=tmp_path / "search", overrides=["training.max_steps=2", "adapter.r=2"])
    assert seen and seen[0][:2] == ["training.max_steps=2", "adapter.r=2"]
    assert json.loads((tmp_path / "search" / "tune.json").read_text())["overrides"] == ["training.max_steps=2",
                                                                                          "adapter.r=2"]


def test_generation_passes_only_the_inputs_the_model_takes(tmp_path):
    """A BERT tokenizer returns token_type_ids; T5's generate refuses them, so they are left out."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from lora_cli.tasks import seq2seq

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", template="bert"))
    assert "token_type_ids" in tok(["hallo welt"])
    config = AutoConfig.for_model(**TINY_CONFIGS["t5"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    out = seq2seq.generate_texts(model, tok, ["hallo welt", "danke"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
