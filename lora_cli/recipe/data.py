"""The ``data`` section, typed per task: where the examples come from and what the columns mean.

Every task reads from one source (a hub ``dataset``, an ``imagefolder``, ``train_file`` /
``validation_file``, or the ``builtin`` digits) with the same split and limit settings;
the columns and their rules are the task's own. A key that does not belong to the
recipe's task, and a column rule broken (a prompt column without its completion column),
is a recipe error at its file and line before anything loads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from lora_cli.task_kinds import CAUSAL_LM, IMAGE_CLASSIFICATION, SEQ2SEQ, SEQ_CLS

DATA_SOURCES = ("dataset", "imagefolder", "train_file", "builtin")
DATA_PATHS = ("imagefolder", "train_file", "validation_file")

TRANSLATION_COLUMN = "translation"
"""The column of {lang: text} records that WMT-style translation datasets have."""


class RuleError(ValueError):
    """A field value a rule refuses: the message and the fix (the loader shows both).

    ``field`` names the key the rule is about when a rule checks several keys together.
    """

    def __init__(self, message: str, hint: str | None = None, field: str | None = None):
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.message = message
        self.hint = hint
        self.field = field


class DataSection(BaseModel):
    """The settings every task's data has: one source, the splits, the sample limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    TASK: ClassVar[str | None] = None

    dataset: str | None = None
    """A hub dataset id."""
    dataset_config: str | None = None
    train_file: str | None = None
    """A local .csv / .tsv / .json / .jsonl file."""
    validation_file: str | None = None
    train_split: str = "train"
    eval_split: str | None = "validation"
    val_split: float = Field(0.1, gt=0, lt=1)
    """The fraction of the training rows held out when the source has no validation split."""
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    _locations: dict = PrivateAttr(default_factory=dict)
    _source: str | None = PrivateAttr(default=None)

    def local_paths(self) -> list[str]:
        """The files and folders this data is read from (``imagefolder``, ``train_file``, ``validation_file``)."""
        return [value for key in DATA_PATHS if (value := getattr(self, key, None))]

    def text_columns(self) -> dict[str, str | None]:
        """{recipe key: column} of the columns that must hold one text per row."""
        return {}

    def where(self, key: str) -> str:
        """``file:line: data.<key>`` of a setting, for problems the data shows later (the line of the
        nearest written parent when the key holds its default)."""
        path: tuple = ("data", key)
        while path and path not in self._locations:
            path = path[:-1]
        location = self._locations.get(path)
        place = location.render() if location is not None else (self._source or "the recipe")
        return f"{place}: data.{key}"


def _policy(value: str, other: str) -> str:
    if value not in ("error", other):
        raise RuleError(
            f"must be one of 'error', '{other}'",
            f"error (the default) stops with a message; {other} leaves those rows out with a warning",
        )
    return value


class _Labelled(DataSection):
    """Classification data: a label column and what to do with rows whose label is unusable."""

    label_column: str = "label"
    missing_labels: str = "error"
    """Rows whose label is empty or missing (an empty CSV cell, a JSON null or absent key,
    -1 in a dataset's class column): ``error`` stops with the file, row and column;
    ``drop`` leaves those rows out with a warning that counts them."""
    unknown_eval_labels: str = "error"
    """Validation rows (or validation class folders) of a class the training data never
    has: ``error`` stops and names the classes and where they are; ``drop`` leaves those
    rows out with a warning that names the classes and counts the rows."""

    @field_validator("missing_labels", "unknown_eval_labels")
    @classmethod
    def _drop_policy(cls, value: str) -> str:
        return _policy(value, "drop")


class ImageData(_Labelled):
    """``image-classification``: images and their class."""

    TASK: ClassVar[str | None] = IMAGE_CLASSIFICATION

    imagefolder: str | None = None
    """A folder laid out as train/<class>/*.jpg (and validation/<class>/*.jpg)."""
    builtin: Literal["digits"] | None = None
    """scikit-learn's digits, shipped with the package: the offline quickstart."""
    image_column: str = "image"
    augment: bool = True
    """Training augmentation (random resized crop + flip); off for data where a flip
    changes the meaning (digits, text in images)."""
    bad_images: str = "error"
    """Images that cannot be used (missing, empty, truncated, not an image, a possible
    decompression bomb), found by a check of every training and validation image before
    anything is written: ``error`` stops and lists the first few with their reasons;
    ``skip`` leaves them out with a warning that counts them."""

    @field_validator("bad_images")
    @classmethod
    def _skip_policy(cls, value: str) -> str:
        return _policy(value, "skip")


class SeqClsData(_Labelled):
    """``seq-cls``: a text (or a text pair) and its class."""

    TASK: ClassVar[str | None] = SEQ_CLS

    text_column: str = "text"
    text_pair_column: str | None = None
    """A second text per row (NLI, paraphrase): the tokenizer joins the two."""
    max_length: int = Field(512, gt=0)

    def text_columns(self) -> dict[str, str | None]:
        return {"data.text_column": self.text_column, "data.text_pair_column": self.text_pair_column}


CAUSAL_FORMATS = ("text", "prompt_completion", "messages", "alpaca")
TOO_LONG_POLICIES = ("truncate", "drop", "error")
TRAIN_ON = ("assistant", "all")
DEFAULT_ROLE_NAMES = {"human": "user", "gpt": "assistant"}
"""ShareGPT's speaker names, mapped to the chat-template roles; ``data.role_names`` adds to them."""
CHAT_KEYS = ("messages_column", "role_key", "content_key", "role_names")
ALPACA_KEYS = ("instruction_column", "input_column", "output_column")
TEMPLATE_KEYS = ("chat_template", "train_on", "system_prompt")


def _choice(value: str, choices: tuple[str, ...], hint: str) -> str:
    if value not in choices:
        raise RuleError(f"must be one of {', '.join(repr(c) for c in choices)}", hint)
    return value


def is_template_text(value: str) -> bool:
    """A ``data.chat_template`` given inline (Jinja), rather than the path of a template file."""
    return "{{" in value or "{%" in value


class CausalLMData(DataSection):
    """``causal-lm``: plain text, prompt/completion pairs, or conversations (``messages``, ``alpaca``)
    rendered with the tokenizer's chat template."""

    TASK: ClassVar[str | None] = CAUSAL_LM

    format: str | None = None
    """``text`` (data.text_column), ``prompt_completion`` (data.prompt_column + completion_column;
    implied by them), ``messages`` (a column of chat messages, OpenAI or ShareGPT style) or
    ``alpaca`` (instruction / input / output columns); the last two go through the chat template."""
    text_column: str = "text"
    prompt_column: str | None = None
    completion_column: str | None = None
    completion_only_loss: bool = False
    """Train on the completion tokens only (the prompt's labels are masked)."""
    messages_column: str | None = None
    """``messages``: the column holding each conversation, a list of messages (default ``messages``;
    ShareGPT data: ``conversations``)."""
    role_key: str | None = None
    """``messages``: the key of a message's speaker (default ``role``; ShareGPT: ``from``)."""
    content_key: str | None = None
    """``messages``: the key of a message's text (default ``content``; ShareGPT: ``value``)."""
    role_names: dict[str, str] | None = None
    """``messages``: speaker names -> template roles (system, user, assistant), added to
    ShareGPT's ``human: user`` and ``gpt: assistant``."""
    instruction_column: str | None = None
    """``alpaca``: the instruction (default ``instruction``); with the input column's text it is the user turn."""
    input_column: str | None = None
    """``alpaca``: optional context put after the instruction (default ``input``; empty cells are fine)."""
    output_column: str | None = None
    """``alpaca``: the answer, the assistant turn (default ``output``)."""
    system_prompt: str | None = None
    """``messages`` / ``alpaca``: a system message put first in every conversation that has none."""
    chat_template: str | None = None
    """``messages`` / ``alpaca``: a Jinja chat template (inline, or the path of a file) used instead of the
    tokenizer's own; the run's saved tokenizer keeps it, so ``predict`` renders prompts the same way."""
    train_on: str = "assistant"
    """``messages`` / ``alpaca``: ``assistant`` learns the assistant turns only (their text and their
    end-of-turn token), ``all`` learns every token of the rendered conversation."""
    too_long: str = "truncate"
    """Rows longer than data.max_length tokens: ``truncate`` (prompts lose their start and keep the
    completion; conversations and texts lose their end), ``drop`` (left out), ``error`` (stop and name
    them). Each split's counts are one warning line."""
    packing: bool = False
    """Pack several training rows into each data.max_length sequence; attention never crosses rows
    (position ids restart per row) and each row keeps its own loss mask."""
    max_length: int = Field(512, gt=0)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is None:
            return value
        return _choice(value, CAUSAL_FORMATS, "messages: chat rows rendered with the chat template; "
                       "alpaca: instruction/input/output rows; text or prompt_completion: plain text")

    @field_validator("too_long")
    @classmethod
    def _too_long(cls, value: str) -> str:
        return _choice(value, TOO_LONG_POLICIES, "truncate (the default) cuts rows to data.max_length; "
                       "drop leaves them out; error stops and names them; each counted in a warning")

    @field_validator("train_on")
    @classmethod
    def _train_on(cls, value: str) -> str:
        return _choice(value, TRAIN_ON, "assistant: learn the assistant turns only; all: every token")

    @model_validator(mode="after")
    def _pairs(self) -> CausalLMData:
        if (self.prompt_column is None) != (self.completion_column is None):
            given, other = ("prompt_column", "completion_column") if self.prompt_column else ("completion_column", "prompt_column")
            raise RuleError(
                f"needs data.{other} too: prompt and completion columns go together",
                "set both (prompt/completion pairs) or neither (plain text from data.text_column)",
                field=given,
            )
        fmt = self.data_format
        if self.prompt_column is not None and fmt != "prompt_completion":
            raise RuleError(f"is for prompt/completion data, not data.format {fmt}",
                            "remove data.prompt_column and data.completion_column", field="prompt_column")
        if fmt == "prompt_completion" and self.prompt_column is None:
            raise RuleError("prompt_completion needs data.prompt_column and data.completion_column",
                            "set both columns", field="format")
        if self.completion_only_loss and fmt != "prompt_completion":
            raise RuleError(
                "needs prompt/completion data",
                "set data.prompt_column and data.completion_column, or remove completion_only_loss"
                + ("; chat data learns the assistant turns only by default (data.train_on)" if self.chat else ""),
                field="completion_only_loss",
            )
        for keys, owner in ((CHAT_KEYS, ("messages",)), (ALPACA_KEYS, ("alpaca",)),
                            (TEMPLATE_KEYS, ("messages", "alpaca"))):
            for key in keys:
                default = type(self).model_fields[key].default
                if getattr(self, key) != default and fmt not in owner:
                    raise RuleError(f"is for data.format {' / '.join(owner)}, and this data is {fmt}",
                                    f"set data.format: {owner[0]}, or remove data.{key}", field=key)
        for name, role in (self.role_names or {}).items():
            if role not in ("system", "user", "assistant", "tool"):
                raise RuleError(f"maps {name!r} to {role!r}, which no chat template knows",
                                "map speaker names to system, user, assistant (or tool)", field="role_names")
        return self

    @property
    def data_format(self) -> str:
        """The format this data is read in (``format``, or what the columns imply)."""
        if self.format is not None:
            return self.format
        return "prompt_completion" if self.prompt_column is not None else "text"

    @property
    def chat(self) -> bool:
        """Rows are conversations rendered with a chat template."""
        return self.data_format in ("messages", "alpaca")

    def chat_columns(self) -> dict[str, str]:
        """{setting: value} of the conversation columns and keys, defaults filled in."""
        return {
            "messages_column": self.messages_column or "messages", "role_key": self.role_key or "role",
            "content_key": self.content_key or "content", "instruction_column": self.instruction_column or "instruction",
            "input_column": self.input_column or "input", "output_column": self.output_column or "output",
        }

    def columns(self) -> dict[str, str | None]:
        """{recipe key: column} of the columns each row must have."""
        fmt, cols = self.data_format, self.chat_columns()
        if fmt == "messages":
            return {"data.messages_column": cols["messages_column"]}
        if fmt == "alpaca":
            return {"data.instruction_column": cols["instruction_column"], "data.output_column": cols["output_column"]}
        if fmt == "prompt_completion":
            return {"data.prompt_column": self.prompt_column, "data.completion_column": self.completion_column}
        return {"data.text_column": self.text_column}

    def text_columns(self) -> dict[str, str | None]:
        """{recipe key: column} of the columns that must hold text (one string per row)."""
        if self.data_format == "messages":
            return {}
        return self.columns()


class Seq2SeqData(DataSection):
    """``seq2seq``: source and target columns, or translation records with two languages."""

    TASK: ClassVar[str | None] = SEQ2SEQ

    source_column: str | None = None
    target_column: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    """With source_lang: rows carry a ``translation`` column of {lang: text} records (WMT16)."""
    source_prefix: str | None = None
    """Text put before each source (T5's "translate German to English: "); derived for translation data."""
    max_length: int = Field(512, gt=0)
    max_target_length: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _mode(self) -> Seq2SeqData:
        for a, b in (("source_column", "target_column"), ("source_lang", "target_lang")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                given, other = (a, b) if getattr(self, a) is not None else (b, a)
                raise RuleError(f"needs data.{other} too: they go together", f"set both {a} and {b}", field=given)
        if self.source_column is None and self.source_lang is None:
            raise RuleError(
                "seq2seq needs data.source_column + data.target_column, or data.source_lang + data.target_lang",
                f"the languages are for rows with a {TRANSLATION_COLUMN!r} column of {{lang: text}} records (WMT16 style)",
            )
        return self

    @property
    def mode(self) -> Literal["columns", "translation"]:
        return "columns" if self.source_column is not None else "translation"

    def columns(self) -> dict[str, str | None]:
        if self.mode == "columns":
            return {"data.source_column": self.source_column, "data.target_column": self.target_column}
        return {"data.source_lang (needs a translation column)": TRANSLATION_COLUMN}

    def text_columns(self) -> dict[str, str | None]:
        return self.columns() if self.mode == "columns" else {}


FLAT_DEFAULTS: dict[str, Any] = {
    "image_column": "image", "label_column": "label", "augment": True, "missing_labels": "error",
    "unknown_eval_labels": "error", "bad_images": "error", "text_column": "text", "completion_only_loss": False,
    "max_length": 512, "max_target_length": 128,
}
"""Keys of other tasks' data that earlier loracli versions (one flat data section for all
tasks) wrote into every run's recipe.yaml at these defaults: read back, they are ignored."""


def without_flat_defaults(raw: dict[str, Any], cls: type[DataSection]) -> dict[str, Any]:
    """``raw`` less the keys ``cls`` lacks that hold their FLAT_DEFAULTS value (older run directories)."""
    return {
        k: v for k, v in raw.items()
        if k in cls.model_fields or k not in FLAT_DEFAULTS or type(v) is not type(FLAT_DEFAULTS[k]) or v != FLAT_DEFAULTS[k]
    }


DATA_SECTIONS: dict[str, type[DataSection]] = {
    cls.TASK: cls for cls in (ImageData, SeqClsData, CausalLMData, Seq2SeqData) if cls.TASK is not None
}


def data_section_for(task: Any) -> type[DataSection]:
    """The data section class of ``task``; the common base when the task is unknown."""
    return DATA_SECTIONS.get(task, DataSection) if isinstance(task, str) else DataSection
