"""Hostile generation inputs for `predict --prompt / --text`: prompts longer than the model's context,
--max-new-tokens past its positions, non-finite or out-of-range sampling options, empty prompts and
empty generations. Each is cut to fit with a note or refused naming the option (exit 2); never an
index error."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml

from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    cli,
    make_tokenizer,
    prompt_rows,
    sentiment_rows,
    translation_rows,
    write_csv,
    write_jsonl,
    write_recipe,
)

LONG = " ".join(["the film was good"] * 40)  # 160 tokens; the tiny models have 64 positions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs: GPT-2 and OPT (64 positions), GPT-2 with 8 p-tuning virtual tokens, T5, BERT."""
    root = tmp_path_factory.mktemp("generation-inputs")
    plain = make_tokenizer(root / "tok-plain")
    bert = make_tokenizer(root / "tok-bert", template="bert")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, adapter in (("gpt2", None), ("opt", None), ("ptuning", {"method": "p_tuning", "num_virtual_tokens": 8})):
            folder = root / name
            folder.mkdir()
            write_jsonl(folder / "train.jsonl", prompt_rows())
            recipe = write_recipe(folder / "recipe.yaml", task="causal-lm",
                                  model={"config": TINY_CONFIGS["opt" if name == "opt" else "gpt2"],
                                         "tokenizer": str(plain)},
                                  data={"train_file": str(folder / "train.jsonl"), "max_length": 32})
            if adapter:
                text = yaml.safe_load(recipe.read_text(encoding="utf-8"))
                text["adapter"] = adapter
                recipe.write_text(yaml.safe_dump(text, sort_keys=False), encoding="utf-8")
            out[name] = run_training(recipe)
        folder = root / "t5"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", translation_rows())
        out["t5"] = run_training(write_recipe(
            folder / "recipe.yaml", task="seq2seq", model={"config": TINY_CONFIGS["t5"], "tokenizer": str(plain)},
            data={"train_file": str(folder / "train.jsonl"), "source_lang": "de", "target_lang": "en",
                  "max_length": 32}, adapter={"target_modules": ["q", "v"]}))
        folder = root / "bert"
        folder.mkdir()
        write_csv(folder / "train.csv", sentiment_rows(48))
        out["bert"] = run_training(write_recipe(
            folder / "recipe.yaml", task="seq-cls", model={"config": TINY_CONFIGS["bert"], "tokenizer": str(bert)},
            data={"train_file": str(folder / "train.csv"), "val_split": 0.25, "max_length": 16}))
    return out


@pytest.mark.parametrize(("name", "room"), [("gpt2", 14), ("opt", 14), ("ptuning", 6)])
def test_a_prompt_longer_than_the_context_is_cut_from_the_front_with_a_note(monkeypatch, capsys, runs, name, room):
    """Before: IndexError (position embeddings). 64 positions (less 8 virtual tokens) minus 50 new tokens."""
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs[name]), "--prompt", LONG, "--json")
    assert code == 0, err
    assert (f"warning: --prompt 1 has 160 tokens; the model's positions leave room for {room} beside 50 new tokens, "
            f"so its first {160 - room} were left out") in err
    rows = json.loads(out)
    assert rows[0]["text"] == LONG and isinstance(rows[0]["generated"], str)


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_max_new_tokens_past_the_positions_is_refused_naming_the_option(monkeypatch, capsys, runs, name):
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(runs[name]), "--prompt", "the film was",
                       "--max-new-tokens", "500")
    assert code == 2 and "Traceback" not in err
    assert "error: --max-new-tokens 500: the model has 64 positions for the prompt and the new tokens together; " \
           "use at most 63" in err
    # the most it takes: the prompt is cut to its last token, with a note
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs[name]), "--prompt", "the film was",
                         "--max-new-tokens", "63", "--json")
    assert code == 0, err
    assert "--prompt 1 has 3 tokens" in err and "its first 2 were left out" in err
    assert json.loads(out)[0]["generated"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--temperature", "nan", "--temperature nan: give a finite number >= 0"),
    ("--temperature", "inf", "--temperature inf: give a finite number >= 0"),
    ("--temperature", "-1", "--temperature -1.0: give a finite number >= 0"),
    ("--top-p", "5", "--top-p 5.0: give a number in (0, 1]"),
    ("--top-p", "nan", "--top-p nan: give a number in (0, 1]"),
    ("--top-p", "0", "--top-p 0.0: give a number in (0, 1]"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: give a whole number from 1 to 8192"),
    ("--max-new-tokens", "1000000000", "--max-new-tokens 1000000000: give a whole number from 1 to 8192"),
])
def test_bad_sampling_options_are_refused_before_the_run_loads(monkeypatch, capsys, tmp_path, option, value, message):
    """The run folder does not exist: the option is checked first."""
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(tmp_path / "nowhere"), "--prompt", "hi",
                       option, value)
    assert code == 2 and message in err and "Traceback" not in err and "nowhere" not in err


def test_sampling_options_are_refused_by_the_library_too(runs):
    from lora_cli.errors import UserInputError
    from lora_cli.inference.loading import load_run

    loaded = load_run(runs["t5"], device="cpu")
    with pytest.raises(UserInputError, match=r"--temperature nan: give a finite number >= 0"):
        loaded.task.generate(loaded, "hallo welt", temperature=float("nan"))


def test_seq2seq_cuts_a_long_source_with_a_note_and_bounds_max_new_tokens(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["t5"]), "--text", LONG, "--json")  # + prefix
    assert code == 0, err
    assert "warning: --text 1 has 164 tokens; the run reads at most 32 (data.max_length), so its last 132 were " \
           "left out" in err
    assert isinstance(json.loads(out)[0]["generated"], str)
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["t5"]), "--text", "hallo welt",
                       "--max-new-tokens", "100000")
    assert code == 2 and "--max-new-tokens 100000: give a whole number from 1 to 8192" in err


def test_a_text_longer_than_the_classifier_reads_is_cut_with_a_note(monkeypatch, capsys, runs):
    """Before: RuntimeError (162 positions against 64)."""
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["bert"]), "--text", LONG, "--json")
    assert code == 0, err
    assert "warning: --text 1 has 162 tokens; the run reads at most 16 (data.max_length), so its last 146 were " \
           "left out" in err
    assert len(json.loads(out)[0]["top_k"]) == 2


def test_an_empty_prompt_is_refused_naming_it(monkeypatch, capsys, runs):
    """Before: IndexError. A causal LM needs at least one token to continue."""
    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["gpt2"]), "--prompt", "the film",
                       "--prompt", "")
    assert code == 2 and "--prompt 2 is empty" in err and "Traceback" not in err


def test_an_empty_generation_prints_as_empty(monkeypatch, capsys, runs):
    """Before: KeyError 'top_k' while printing a row whose generated text is ''."""
    from lora_cli.tasks import causal_lm

    monkeypatch.setattr(causal_lm, "predict", lambda loaded, texts, **options: [{"text": t, "generated": ""}
                                                                               for t in texts])
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["gpt2"]), "--prompt", "the film was")
    assert code == 0, err
    assert out.rstrip("\n").endswith("the film was ->") or out.rstrip("\n").endswith("the film was -> ")
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["gpt2"]), "--prompt", "the film was",
                         "--json")
    assert code == 0 and json.loads(out) == [{"text": "the film was", "generated": ""}]
