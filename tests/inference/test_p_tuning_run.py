"""`adapter.method: p_tuning` through the verbs: train, eval, predict, merge (refused), PEFT loading.

One tiny run per text task (trained once, about a minute: the tests that read them are
marked slow; the recipe check at the end is not). The base models are random-init from configs and the tokenizer
is trained on the spot (tests.helpers_text), so nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lora_cli.inference.loading import load_run
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    cli,
    eval_batch,
    logits_of,
    make_tokenizer,
    prompt_rows,
    require_method,
    sentiment_rows,
    translation_rows,
    write_csv,
    write_jsonl,
    write_recipe,
)

P_TUNING = {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}
TRAINING = {"learning_rate": 3e-2, "max_steps": 6}


def p_tuning_recipe(path: Path, adapter: dict | None = None, **kwargs) -> Path:
    """write_recipe's recipe with the adapter section replaced by p-tuning's."""
    write_recipe(path, training=TRAINING, **kwargs)
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["adapter"] = {**P_TUNING, **(adapter or {})}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_method("p_tuning")
    root = tmp_path_factory.mktemp("p-tuning-runs")
    plain = make_tokenizer(root / "tok-plain")
    bert = make_tokenizer(root / "tok-bert", template="bert")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = root / "cls"
        cls.mkdir()
        write_csv(cls / "train.csv", sentiment_rows(48))
        out["seq-cls"] = run_training(p_tuning_recipe(
            cls / "recipe.yaml", task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert)},
            data={"train_file": str(cls / "train.csv"), "val_split": 0.25, "max_length": 16,
                  "text_pair_column": "pair"}))
        lm = root / "lm"
        lm.mkdir()
        write_jsonl(lm / "train.jsonl", prompt_rows())
        out["causal-lm"] = run_training(p_tuning_recipe(
            lm / "recipe.yaml", task="causal-lm", model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(plain)},
            data={"train_file": str(lm / "train.jsonl"), "max_length": 32}, adapter={"encoder_reparameterization_type": "LSTM"}))
        mt = root / "mt"
        mt.mkdir()
        write_jsonl(mt / "train.jsonl", translation_rows())
        out["seq2seq"] = run_training(p_tuning_recipe(
            mt / "recipe.yaml", task="seq2seq", model={"config": TINY_CONFIGS["t5"], "tokenizer": str(plain)},
            data={"train_file": str(mt / "train.jsonl"), "source_lang": "de", "target_lang": "en", "max_length": 32}))
    return out


AUTO = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
        "seq2seq": "AutoModelForSeq2SeqLM"}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(AUTO))
def test_trained_run_writes_peft_files_that_peft_loads_with_equal_logits(runs, task):
    import peft
    import transformers

    adapter = runs[task] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["num_virtual_tokens"] == 4 and "target_modules" not in config
    run = load_run(runs[task], device="cpu")
    batch = eval_batch(run)
    ours = logits_of(run.model, batch)
    with run.model.disable_adapter():
        plain = logits_of(run.model, batch)
    if task == "causal-lm":
        assert ours.shape[1] == plain.shape[1] + 4  # the virtual tokens' positions come first, as in PEFT
    assert not torch.allclose(plain, ours[:, -plain.shape[1]:], atol=1e-4), "the trained prompt changes nothing"
    base = getattr(transformers, AUTO[task]).from_pretrained(runs[task] / "base_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
        torch.testing.assert_close(logits_of(theirs, batch), ours, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_classification_adapter_holds_the_prompt_and_the_head_as_peft_names_them(runs):
    from safetensors.torch import load_file

    state = load_file(runs["seq-cls"] / "adapter" / "adapter_model.safetensors")
    assert set(state) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    assert state["prompt_embeddings"].shape == (4, 32)
    losses = [json.loads(line)["loss"] for line in (runs["seq-cls"] / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
def test_eval_of_a_generative_run_reports_loss_and_perplexity(monkeypatch, capsys, runs, task):
    code, out, err = cli(monkeypatch, capsys, "eval", str(runs[task]), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_tokens"] > 0 and math.isfinite(report["loss"]) and report["loss"] > 0
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


@pytest.mark.slow
def test_trainer_perplexity_of_a_causal_run_lines_up_with_the_prepended_tokens(runs):
    """The Trainer's metric reads logits n tokens longer than the labels; its token NLL must be
    the model's own loss on the same rows."""
    from lora_cli.tasks import causal_lm

    run = load_run(runs["causal-lm"], device="cpu")
    batch = eval_batch(run)
    with torch.no_grad():
        out = run.model(**batch)
    assert out.logits.shape[1] == batch["labels"].shape[1] + 4
    nll, count = causal_lm.preprocess_logits_for_metrics(out.logits, batch["labels"]).sum(0)
    assert float(nll / count) == pytest.approx(float(out.loss), rel=1e-5)


@pytest.mark.slow
def test_eval_of_a_classification_run_has_accuracy(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "eval", str(runs["seq-cls"]), "--json")
    assert code == 0, err
    assert 0 <= json.loads(out)["accuracy"] <= 1


@pytest.mark.slow
def test_predict_text_prompt_and_translation(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["seq-cls"]), "--text", "the film was good",
                         "--json")
    assert code == 0, err
    assert json.loads(out)[0]["top_k"][0]["label"] in ("neg", "pos")
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["causal-lm"]), "--prompt", "the film was",
                         "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["text"] == "the film was" and isinstance(json.loads(out)[0]["generated"], str)
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["seq2seq"]), "--text", "guten morgen",
                         "--max-new-tokens", "4")
    assert code == 0, err
    assert "guten morgen" in out


@pytest.mark.slow
def test_merge_is_bad_input_that_names_the_deliverable(monkeypatch, capsys, runs, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "merge", str(runs["seq-cls"]), "--out", str(tmp_path / "merged"))
    assert code == 2, err
    assert "p_tuning" in err and "no weights to merge" in err and "loracli predict --run" in err
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_before_loading_the_model(monkeypatch, capsys, tmp_path):
    """Only the adapter's config is read: the refusal needs no base model or data."""
    from lora_cli.adapters import get_adapter_model
    from lora_cli.adapters.methods.p_tuning.config import PromptEncoderConfig
    from lora_cli.errors import UserInputError
    from lora_cli.inference.merge import merge_run
    from tests.helpers import tiny_gpt2

    model = get_adapter_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.save_pretrained(tmp_path / "run" / "adapter")
    code, _, err = cli(monkeypatch, capsys, "merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 2 and "cannot merge: a p_tuning adapter has no weights to merge" in err
    with pytest.raises(UserInputError, match="nothing written"):
        merge_run(model, None, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_the_trainer_normalises_a_causal_loss_by_every_label(tmp_path):
    """Virtual tokens in front: labels[0] is predicted too, so the Trainer's token count (its
    loss normaliser) must count it, and the normalised loss is then the model's own mean."""
    from transformers import TrainingArguments

    from lora_cli.adapters import get_adapter_model
    from lora_cli.adapters.methods.p_tuning.config import PromptEncoderConfig
    from lora_cli.training.trainer import AdapterTrainer
    from tests.helpers import tiny_gpt2

    model = get_adapter_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    trainer = AdapterTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                 report_to=[]))
    ids = torch.randint(2, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :2] = -100
    count = trainer._get_num_items_in_batch([{"input_ids": ids, "labels": labels}], torch.device("cpu"))
    assert int(count) == int((labels != -100).sum())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=count).loss,
                                   model(input_ids=ids, labels=labels).loss)


def test_layer_settings_in_a_p_tuning_recipe_are_named_with_file_and_line(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(8))
    recipe = p_tuning_recipe(folder / "recipe.yaml", adapter={"target_modules": ["query"], "num_virtual_tokens": 0},
                             task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": "unused"},
                             data={"train_file": str(folder / "train.csv")})
    code, _, err = cli(monkeypatch, capsys, "train", str(recipe))
    assert code == 2
    assert "recipe.yaml:" in err and "target_modules" in err and "is not a p_tuning setting" in err
    assert "num_virtual_tokens" in err and ">= 1" in err
    assert not (folder / "run").exists()


def test_p_tuning_on_an_image_task_is_bad_input_that_points_to_lora(monkeypatch, capsys, tmp_path):
    from tests.helpers import make_imagefolder
    from tests.training._util import recipe_dict

    images = make_imagefolder(tmp_path / "images", per_class=(2, 1))
    recipe = recipe_dict(images, tmp_path / "run")
    recipe["adapter"] = dict(P_TUNING)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    code, _, err = cli(monkeypatch, capsys, "train", str(path))
    assert code == 2
    assert "adapter.method: does not work with task image-classification" in err and "use method lora" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_continues_the_whole_encoder_not_just_its_output(tmp_path):
    """The adapter file holds the encoder's output only; --resume must restore the LSTM and
    MLP themselves (the checkpoint's raw tensors) to end where an uninterrupted run ends."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = True

    plain = make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    adapter = {"encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2, "encoder_dropout": 0.1}
    training = {**TRAINING, "save_strategy": "steps", "save_steps": 3}
    runs = {}
    for name in ("straight", "stopped"):
        folder = tmp_path / name
        folder.mkdir()
        recipe = p_tuning_recipe(folder / "recipe.yaml", adapter=adapter, task="causal-lm",
                                 model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(plain)},
                                 data={"train_file": str(tmp_path / "train.jsonl"), "max_length": 32})
        data = yaml.safe_load(recipe.read_text())
        data["training"].update(training)
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "straight":
                runs[name] = run_training(recipe)
            else:
                stopped = run_training(recipe, extra_callbacks=[StopAfterCheckpoint()])
                first = load_file(stopped / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
                runs[name] = run_training(recipe, resume=True)
    expected, got = (load_file(runs[n] / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
                     for n in ("straight", "stopped"))
    assert (first - expected).abs().max() > 1e-4, "the stop should come before the end"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
