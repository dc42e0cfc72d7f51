"""Builders for the text-task tests: a word-level tokenizer trained on the spot, tiny data, recipes.

No download: the tokenizer is trained with the `tokenizers` library on the test corpus and
saved as a transformers tokenizer folder; models are built from configs in the recipes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from lora_cli.adapters import available_methods

PAD, UNK, CLS, SEP, EOS = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"

POSITIVE = ["good", "great", "happy", "lovely", "fine", "nice"]
NEGATIVE = ["bad", "awful", "sad", "poor", "ugly", "grim"]
THINGS = ["film", "meal", "day", "book", "song", "trip"]

# German -> English word pairs for the translation data.
DE_EN = [
    ("hallo welt", "hello world"), ("guten morgen", "good morning"), ("danke", "thanks"),
    ("gute nacht", "good night"), ("das haus", "the house"), ("der hund", "the dog"),
    ("die katze", "the cat"), ("ein buch", "a book"), ("mein freund", "my friend"),
    ("das ist mein auto", "that is my car"), ("der baum", "the tree"), ("die stadt", "the city"),
]


def sentiment_rows(n: int = 48) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        words, label = (POSITIVE, "pos") if i % 2 == 0 else (NEGATIVE, "neg")
        rows.append({"text": f"the {THINGS[i % len(THINGS)]} was {'very ' * (i % 3)}{words[(i // 2) % len(words)]}",
                     "pair": f"very {words[(i // 3) % len(words)]}", "label": label})
    return rows


def prompt_rows(n: int = 24) -> list[dict[str, str]]:
    """Prompts "the <thing> was" -> " [very]* <word> and <word>"; lengths vary, so batches pad."""
    rows = []
    for i in range(n):
        completion = " ".join(["very"] * (i % 3) + [POSITIVE[i % 6], "and", POSITIVE[(i + 1) % 6]])
        prompt = f"the {THINGS[i % 6]} was"
        rows.append({"prompt": prompt, "completion": " " + completion, "text": f"{prompt} {completion}"})
    return rows


def translation_rows(repeat: int = 3) -> list[dict]:
    return [{"translation": {"de": de, "en": en}} for _ in range(repeat) for de, en in DE_EN]


def corpus() -> list[str]:
    words = POSITIVE + NEGATIVE + THINGS + ["the", "was", "very", "and", "translate", "german", "to", "english:"]
    words += [w for pair in DE_EN for text in pair for w in text.split()]
    return [" ".join(words)]


def make_tokenizer(folder: Path, template: str = "plain") -> Path:
    """A word-level tokenizer saved to ``folder``.

    template: "plain" adds nothing (GPT-2 style), "eos" appends </s> (T5 style),
    "bert" wraps as [CLS] a [SEP] (b [SEP]).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=[PAD, UNK, CLS, SEP, EOS]))
    ids = {t: tok.token_to_id(t) for t in (CLS, SEP, EOS)}
    if template == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, ids[EOS])])
    elif template == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
            special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS,
        cls_token=CLS if template == "bert" else None, sep_token=SEP if template == "bert" else None,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"] if template == "bert"
        else ["input_ids", "attention_mask"],
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# initializer_range 0.2: a random base this small with the default 0.02 gives a low-rank update
# almost nothing to steer (LoRA, like PEFT's, then barely learns).
TINY_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
             "initializer_range": 0.2},
    "opt": {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "ffn_dim": 37, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "initializer_range": 0.2},
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 37, "max_position_embeddings": 64, "initializer_range": 0.2},
    "t5": {"model_type": "t5", "d_model": 32, "d_kv": 8, "num_layers": 2, "num_heads": 2, "d_ff": 37},
}

METHOD_OPTIONS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "loha": {"r": 4, "alpha": 8},
    "lokr": {"r": 4, "alpha": 8},
    "adalora": {"init_r": 4, "target_r": 2, "lora_alpha": 8, "tinit": 1, "tfinal": 1, "deltaT": 1},
}


def write_recipe(path: Path, *, task: str, model: dict, data: dict, method: str = "lora",
                 adapter: dict | None = None, training: dict | None = None, name: str = "t") -> Path:
    recipe = {
        "name": name,
        "task": task,
        "output_dir": str(path.parent / "run"),
        "seed": 0,
        "model": model,
        "data": data,
        "adapter": {"method": method, **METHOD_OPTIONS[method], **(adapter or {})},
        "training": {
            "max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 64, "logging_steps": 2, "save_strategy": "no",
            "eval_strategy": "no", "use_cpu": True, **(training or {}),
        },
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ checks

def require_method(method: str) -> None:
    """A method the tests name must be registered: a lost method fails, never skips."""
    assert method in available_methods(), f"adapter method {method} is not registered"


def eval_batch(run, n: int = 6) -> dict[str, torch.Tensor]:
    """A padded batch of the run's own validation rows."""
    ds = run.task.eval_dataset(run.recipe.data, run.recipe.seed, run.processor, split="validation", limit=n)
    rows = [ds[i] for i in range(len(ds))]
    batch = run.task.make_collator(run.processor, run.recipe.data)(rows)
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    return batch


def logits_of(model, batch) -> torch.Tensor:
    """Logits without a loss (PEFT's AdaLoRA cannot compute one in inference mode).

    Encoder-decoders get decoder inputs from the labels: start token, then the labels shifted right.
    """
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is not None and labels.dim() == 2 and getattr(model.config, "is_encoder_decoder", False):
        start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
        decoder = torch.cat([start, labels[:, :-1]], 1)
        batch["decoder_input_ids"] = decoder.masked_fill(decoder == -100, model.config.pad_token_id)
    with torch.no_grad():
        return model(**batch).logits


def assert_merge_and_peft_agree(run, auto_cls, batch, atol: float = 1e-5) -> torch.Tensor:
    """Adapter logits == merged logits == PEFT's logits for the same base and adapter files."""
    import peft

    ours = logits_of(run.model, batch)
    with run.model.disable_adapter():
        base = logits_of(run.model, batch)
    assert not torch.allclose(ours, base, atol=1e-4), "the trained adapter changes nothing"

    merged = copy.deepcopy(run.model).merge_and_unload()
    assert not any("lora_" in n or "hada_" in n or "lokr_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, batch), ours, atol=atol, rtol=1e-4)

    base_dir = Path(run.run_dir) / "base_model"
    theirs = peft.PeftModel.from_pretrained(auto_cls.from_pretrained(base_dir), Path(run.run_dir) / "adapter").eval()
    torch.testing.assert_close(logits_of(theirs, batch), ours, atol=atol, rtol=1e-4)
    return ours


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``loracli ARGS`` in this process: (exit code, stdout, stderr)."""
    import sys

    import pytest

    from lora_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["loracli", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# ------------------------------------------------------------------ chat
GPT2_EOS = "<|endoftext|>"
GPT2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}:{{ ' ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A chat template for GPT-2, which has none: ``role: content``, the assistant's turn ended by
GPT-2's <|endoftext|>; the generation prompt ``assistant:`` leaves the space to the answer's
first token, as GPT-2's byte-level tokens carry it (" Paris")."""

CHAT_FACTS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"),
              ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]


def chat_rows(n: int = 24) -> list[dict]:
    """Conversations in OpenAI's format: one or two exchanges, a system prompt on every third."""
    rows = []
    for i in range(n):
        country, capital = CHAT_FACTS[i % len(CHAT_FACTS)]
        messages = [{"role": "user", "content": f"capital of {country}?"},
                    {"role": "assistant", "content": f"{capital}."}]
        if i % 2:
            other, town = CHAT_FACTS[(i + 3) % len(CHAT_FACTS)]
            messages += [{"role": "user", "content": f"and {other}?"}, {"role": "assistant", "content": f"{town}."}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "be brief."})
        rows.append({"messages": messages})
    return rows


def make_gpt2_tokenizer(folder: Path) -> Path:
    """A GPT-2-style tokenizer (byte-level BPE, <|endoftext|> as BOS/EOS/UNK, no pad token, no chat
    template) trained on the chat rows' words, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["".join(f"{m['role']}: {m['content']}\n" for m in row["messages"]) for row in chat_rows(48)] + corpus()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=[GPT2_EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder
