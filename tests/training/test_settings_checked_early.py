"""Settings that used to fail only after work was done (a trial trained, a training step taken) are
refused before it starts: tune's --metric, training.metric_for_best_model, load_best_model_at_end's
save / eval steps. Each names what the task offers."""

from __future__ import annotations

import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.training.tune import check_metric
from tests.training._util import loracli, write_recipe


@pytest.fixture
def recipe(tmp_path, imagefolder):
    return write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run",
                        training={"eval_strategy": "steps", "eval_steps": 2, "max_steps": 4})


def test_an_unknown_tune_metric_is_refused_before_trial_1(monkeypatch, capsys, tmp_path, recipe):
    """Before: one trial trained, then a traceback and exit 2, the search folder left behind."""
    out = tmp_path / "search"
    code = loracli(monkeypatch, "tune", recipe, "--space", "adapter.r=int(2,8)", "--metric", "eval_bogus",
                   "--trials", "1", "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("--metric eval_bogus: an image-classification run reports eval_loss, eval_accuracy (during training) "
            "and eval_macro_f1, eval_top_k_accuracy (at the end)") in err
    assert not out.exists()


@pytest.mark.parametrize(("task", "metric", "expected"), [
    ("image-classification", "eval_accuracy", "accuracy"),
    ("image-classification", "accuracy", "accuracy"),
    ("image-classification", "macro_f1", "macro_f1"),
    ("causal-lm", "eval_perplexity", "perplexity"),
    ("seq2seq", "eval_bleu", "bleu"),
    ("seq-cls", "eval_f1_macro", "f1_macro"),
    ("seq-cls", "eval_runtime", "runtime"),
])
def test_metrics_each_task_reports_are_taken(task, metric, expected):
    assert check_metric(task, metric) == expected


@pytest.mark.parametrize(("task", "metric", "hint"), [
    ("causal-lm", "eval_accuracy", "eval_perplexity"),  # tune's default metric on a language model
    ("image-classification", "eval_acuracy", "did you mean eval_accuracy?"),
    ("image-classification", "eval_bleu", "eval_accuracy"),
])
def test_metrics_a_task_does_not_report_are_refused_with_the_choices(task, metric, hint):
    with pytest.raises(UserInputError, match=rf"--metric {metric}: an? {task} run reports .*{hint}"):
        check_metric(task, metric)


@pytest.mark.parametrize(("value", "message"), [
    ("bogus", "is not an evaluation metric of an image-classification run"),
    ("eval_macro_f1", "is not an evaluation metric of an image-classification run"),  # only at the end
])
def test_metric_for_best_model_is_checked_at_its_line(recipe, value, message):
    """Before: training ran to its first evaluation, then KeyError (internal error)."""
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, ["training.load_best_model_at_end=true", "training.save_strategy=steps",
                             "training.save_steps=2", f"training.metric_for_best_model={value}"])
    text = str(info.value)
    assert f"training.metric_for_best_model: {message}" in text and "loss, accuracy" in text


def test_metric_for_best_model_takes_the_task_metrics(recipe):
    for value in ("accuracy", "eval_accuracy", "loss", "eval_loss"):
        loaded = load_recipe(recipe, ["training.load_best_model_at_end=true", "training.save_strategy=steps",
                                      "training.save_steps=2", f"training.metric_for_best_model={value}"])
        assert loaded.training["metric_for_best_model"] == value


def test_best_model_save_steps_must_be_a_multiple_of_eval_steps(recipe):
    """Before: refused only once TrainingArguments was built, after the model and data loaded."""
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, ["training.load_best_model_at_end=true", "training.save_strategy=steps",
                             "training.eval_steps=3", "training.save_steps=2"])
    assert "training.save_steps: must be a multiple of eval_steps (3) with load_best_model_at_end" in str(info.value)
    assert load_recipe(recipe, ["training.load_best_model_at_end=true", "training.save_strategy=steps",
                                "training.eval_steps=2", "training.save_steps=4"])


def test_a_search_that_would_not_run_as_meant_is_warned_about_before_trial_1(recipe, tmp_path, imagefolder):
    from lora_cli.training.tune import _check_search

    loaded = load_recipe(recipe)  # eval_strategy steps
    with pytest.warns(UserWarning, match=r"--metric eval_loss is better when lower, but --direction is maximize"):
        _check_search(loaded, "eval_loss", "maximize", None)
    with pytest.warns(UserWarning, match=r"--metric eval_macro_f1 is computed only at the end of a trial"):
        _check_search(loaded, "eval_macro_f1", "maximize", None)
    no_eval = load_recipe(write_recipe(tmp_path / "no-eval.yaml", imagefolder, tmp_path / "run2"))
    with pytest.warns(UserWarning, match=r"training.eval_strategy is 'no': .* no trial will be stopped early"):
        _check_search(no_eval, "eval_accuracy", "maximize", None)


def test_a_lower_is_better_best_model_metric_needs_greater_is_better_false(tmp_path):
    """The Trainer would take perplexity as higher-is-better and keep the worst checkpoint."""
    from tests.helpers_text import TINY_CONFIGS, make_tokenizer, prompt_rows, write_jsonl
    from tests.helpers_text import write_recipe as write_text_recipe

    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    path = write_text_recipe(tmp_path / "lm.yaml", task="causal-lm",
                             model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(make_tokenizer(tmp_path / "tok"))},
                             data={"train_file": str(tmp_path / "train.jsonl")})
    best = ["training.load_best_model_at_end=true", "training.eval_strategy=steps", "training.save_strategy=steps",
            "training.eval_steps=2", "training.save_steps=2", "training.metric_for_best_model=eval_perplexity"]
    with pytest.raises(RecipeError, match=r"metric_for_best_model: is better when lower.*add greater_is_better: false"):
        load_recipe(path, best)
    assert load_recipe(path, [*best, "training.greater_is_better=false"]).training["greater_is_better"] is False
    with pytest.raises(RecipeError, match=r"is not an evaluation metric of a causal-lm run .*loss, perplexity, token_nll"):
        load_recipe(path, [*best[:-1], "training.metric_for_best_model=accuracy"])
