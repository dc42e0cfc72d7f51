"""Adapter configs: typed, validated, and (de)serialised in PEFT's ``adapter_config.json`` format.

Every method config derives from :class:`AdapterConfig`, which owns the fields shared by
all methods (what to target, what to train in full, per-module patterns) and the JSON
round trip. Field names and defaults are PEFT's: they are a file format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lora_cli import atomic
from lora_cli.adapters import user_regex
from lora_cli.adapters.registry import available_methods, get_method
from lora_cli.errors import AdapterConfigError, LoraCliError, Problem, ProblemsError, UserInputError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# Keys PEFT writes that we do not model. They are dropped on load when they hold a
# harmless value; when they switch on a feature we do not implement, loading fails
# loudly instead of silently giving different outputs.
_PEFT_FEATURES_WE_LACK = {
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
}
_LORA_ONLY_FEATURES = {
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on nn.Parameter objects (target_parameters)",
}
"""LoRA options loracli implements for LoRA only: set in another method's file, they fail loudly."""


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _is_truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not (isinstance(value, (dict, list, str)) and not value)


@dataclass
class AdapterConfig:
    """Fields every adapter method shares, and the facts about a method that the rest of loracli
    asks (its name in prose, whether it shards, merges, or runs on a quantized base, how its size
    is shown, which settings carry over from another method).

    Subclasses set ``peft_type`` and ``method`` and add their own fields; they extend
    :meth:`problems` to validate those fields, and override the facts that differ from the defaults.
    """

    peft_type: ClassVar[str] = ""
    method: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    """The method's name in prose ("LoRA", "X-LoRA"): :meth:`title`."""
    task_types: ClassVar[tuple[str, ...] | None] = None
    """The PEFT task types the method works with; None: any model."""
    on_quantized_base: ClassVar[bool] = False
    """Whether the method is tested on a bitsandbytes-quantized base (QLoRA)."""
    shard_refusal: ClassVar[str | None] = None
    """Why the method cannot train with FSDP or DeepSpeed (which split parameters and gradients
    across processes), or None when it can."""
    merge_refusal: ClassVar[str | None] = None
    """Why the method cannot be merged into the base weights ("a <method> adapter <why>"), or None."""
    LAYER_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Inherited fields the method does not use (prompt learning adapts no layer): not offered in recipes."""
    carried_names: ClassVar[dict[str, str | None]] = {}
    """When ``sweep`` or ``tune`` change ``adapter.method``, the settings of the method before that this
    one takes under another name, {their name: ours}; None for one this method has but does not take
    (AdaLoRA's unused ``r``). Settings not listed carry over where this method has them."""
    peft_fields: ClassVar[frozenset[str] | None] = None
    """The fields PEFT's config class for the method has, where it lacks some of the shared
    ones here; :meth:`save_pretrained` leaves the others out while they hold their defaults
    (PEFT would warn that it ignores them). None: PEFT has them all."""

    target_modules: list[str] | str | None = None
    """Module names (exact or dotted suffix), a regex (full match), or "all-linear"."""
    exclude_modules: list[str] | str | None = None
    """Removed from the targets, matched by the same rules."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules whose layer index is listed."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. "layers", "h"), for layers_to_transform."""
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    """Per-module rank: {regex over a dotted suffix: r}."""
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    """Per-module alpha: {regex over a dotted suffix: alpha}."""
    modules_to_save: list[str] | None = None
    """Modules trained in full (e.g. a new classifier head) and saved with the adapter."""
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.layers_to_transform, int) and not isinstance(
            self.layers_to_transform, bool
        ):
            self.layers_to_transform = [self.layers_to_transform]
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        problems = list(self.problems())
        if problems:
            raise AdapterConfigError(problems, method=self.method or "adapter")

    # ----------------------------------------------------------------- validation
    def problems(self) -> list[Problem]:
        """Everything wrong with this config; empty when it is usable."""
        out: list[Problem] = []
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                out += _regex_problem(name, value)
            elif not (isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)):
                out.append(Problem(name, "must be a list of module names or one regex string", value))
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            out.append(
                Problem("layers_to_transform", "must be a layer index or a list of indices >= 0", self.layers_to_transform)
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            out.append(
                Problem(
                    "layers_pattern",
                    "only has an effect together with layers_to_transform",
                    self.layers_pattern,
                    hint="add layers_to_transform or remove layers_pattern",
                )
            )
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                out.append(Problem(name, "must be a mapping {regex: value}", value))
                continue
            for key in value:
                out += _regex_problem(f"{name}[{key!r}]", key)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) for v in self.modules_to_save)
        ):
            out.append(Problem("modules_to_save", "must be a list of module names", self.modules_to_save))
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            out.append(
                Problem("task_type", "is not a PEFT task type", self.task_type, hint=f"use one of {', '.join(TASK_TYPES)} or null")
            )
        return out

    # ------------------------------------------------------------------- facts
    @classmethod
    def title(cls) -> str:
        """The method's name in prose: ``display_name``, else the recipe name."""
        return cls.display_name or cls.method

    @classmethod
    def shown_method(cls, saved: dict[str, Any]) -> str:
        """The method of a saved ``adapter_config.json`` as ``loracli compare`` lists it (a variant by its
        own name: LoRA's "dora")."""
        return cls.method

    @classmethod
    def size_label(cls, saved: dict[str, Any]) -> str:
        """How big a saved ``adapter_config.json`` of this method is, for ``loracli compare``'s rank/alpha
        column ("16/32" for LoRA); "-" for a method with no rank."""
        return "-"

    @classmethod
    def derived_settings(cls, options: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        """Settings this method works out from another method's ``options`` when ``sweep`` or ``tune``
        change ``adapter.method``: {ours: (the setting it came from, value)} (AdaLoRA's ranks from ``r``)."""
        return {}

    # ------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            data[f.name] = value
        data["peft_type"] = self.peft_type
        return data

    def json_text(self) -> str:
        """``adapter_config.json`` as PEFT writes it: sorted keys, indent 2, inference mode."""
        data = self.to_dict()
        data["inference_mode"] = True
        if self.peft_fields is not None:
            defaults = {f.name: f for f in dataclasses.fields(self)}
            for name in [k for k in data if k not in self.peft_fields and k in defaults]:
                if data[name] == _default_of(defaults[name]):
                    del data[name]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write :meth:`json_text` to ``directory``/``adapter_config.json``, whole or not at all."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_text(path, self.json_text())

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Build the right config subclass from a PEFT-style dict.

        Called on the base class it dispatches on ``peft_type``; unknown PEFT keys holding
        default values are dropped (logged), unknown keys that would switch on a feature we
        do not implement raise.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target_cls = cls
        if peft_type is not None and not isinstance(peft_type, str):
            raise UserInputError(
                f"{source}: 'peft_type' must be a string such as \"LORA\", got {_short(peft_type)}; "
                f"set it to one of {', '.join(_peft_types())}"
            )
        if cls is AdapterConfig:
            if peft_type is None:
                raise UserInputError(
                    f"{source}: no 'peft_type' key; cannot tell which adapter method it is. "
                    f"Add \"peft_type\": one of {', '.join(_peft_types())}"
                )
            try:
                target_cls = get_method(peft_type).config_cls
            except UserInputError:
                raise UserInputError(
                    f"{source}: key 'peft_type': unknown adapter method {_short(peft_type)}; loracli loads "
                    f"{', '.join(_peft_types())} adapters (fix the value, or load this adapter with PEFT itself)"
                ) from None
        elif peft_type is not None and peft_type != cls.peft_type:
            raise UserInputError(f"{source}: peft_type is {peft_type!r}, expected {cls.peft_type!r}")
        known = set(target_cls.field_names())
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _LORA_ONLY_FEATURES and _is_truthy(value):
                raise UserInputError(
                    f"{source}: '{key}' is set, but loracli has {_LORA_ONLY_FEATURES[key]} for LoRA adapters only, "
                    f"not {target_cls.method or 'this method'}; remove the key, or save the adapter as LoRA"
                )
            elif key in _PEFT_FEATURES_WE_LACK and _is_truthy(value):
                raise UserInputError(
                    f"{source}: '{key}' is set, but loracli does not implement "
                    f"{_PEFT_FEATURES_WE_LACK[key]}; remove the key to use the adapter without it"
                )
            else:
                logger.debug("%s: ignoring key %r", source, key)
        try:
            return target_cls(**kwargs)
        except AdapterConfigError as exc:
            if source == "adapter config":  # built in code, not read from a file
                raise
            raise AdapterConfigFileError(exc.problems, target_cls.method or "adapter", source) from None
        except LoraCliError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a value of a type nothing expected
            raise UserInputError(
                f"{source}: a value has the wrong type ({type(exc).__name__}: {str(exc)[:200]}); "
                "compare the file with one written by PEFT's save_pretrained and fix or remove that key"
            ) from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AdapterConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise UserInputError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory?")
        fix = "restore it from a copy of the adapter, or save the adapter again (loracli train, or PEFT's save_pretrained)"
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise UserInputError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UserInputError(f"{path}: not valid UTF-8 JSON ({reason}); {fix}") from None
        if not isinstance(data, dict):
            raise UserInputError(
                f"{path}: expected a JSON object of adapter settings ({{\"peft_type\": \"LORA\", ...}}), "
                f"found a JSON {_json_kind(data)}; {fix}"
            )
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------- per-module values
    def pattern_value(self, pattern: dict[str, Any], module_path: str, default: Any) -> Any:
        """Value of ``pattern`` whose regex matches a dotted suffix of ``module_path``."""
        for key, value in pattern.items():
            if user_regex.fullmatch(rf"(.*\.)?(?:{key})", module_path):
                return value
        return default


class AdapterConfigFileError(AdapterConfigError):
    """An adapter_config.json whose values a method cannot use: names the file, each key and the fix."""

    def __init__(self, problems: list[Problem], method: str, source: str) -> None:
        self.source = source
        ProblemsError.__init__(
            self,
            problems,
            header=f"{source}: invalid {method} adapter config (fix the key(s) below in the file, or save the adapter again)",
        )


def _peft_types() -> list[str]:
    return sorted(get_method(name).peft_type for name in available_methods())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: Any) -> str:
    for kind, types in (("list", list), ("string", str), ("boolean", bool), ("number", (int, float))):
        if isinstance(value, types):
            return kind
    return "null" if value is None else type(value).__name__


def _regex_problem(name: str, pattern: str) -> list[Problem]:
    why = user_regex.problem(pattern)  # compiles, and cannot backtrack for hours on a module name
    return [Problem(name, why, pattern)] if why else []
