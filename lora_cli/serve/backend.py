"""Everything ``loracli serve`` takes from the rest of loracli, in one module.

Loading runs, preparing a request's input as ``predict`` prepares it, one forward over a
batch of rows that may each use another run's adapter, generation, and the run cards: the
HTTP side (:mod:`lora_cli.serve.app`) and the batcher only see the :class:`Backend` below,
so a move of the code it calls touches this file alone.

Runs that share a base share one model in memory (:func:`base_key`): the first run of a
group is loaded with :func:`~lora_cli.inference.loading.load_run`, the others are loaded
into it as further adapters. Two runs share a base only when it really is the same one:
the same pretrained model (name or path, revision, quantization), or, for runs built from
``model.config``, byte-identical ``base_model/`` weights (SHA-256 of the safetensors and
of the config). The same task, method and head size are needed too, since one model holds
adapters of one method and one head shape. A run whose method wraps the whole model
(p-tuning, X-LoRA) or that rewrote its base (LoftQ) gets a model of its own.

A batch runs as one forward with ``adapter_names`` per row (the engine's mixed batches)
when every adapter in it can mix; :func:`mixable` asks the adapted layers, which refuse
for LoHa, LoKr, AdaLoRA, DoRA and a few layer kinds. The batcher never mixes those: it
gives each such run forwards of its own (:meth:`ServedRun.batch_key`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_cli import rundir as rd
from lora_cli.adapters import AdapterConfig, get_method
from lora_cli.adapters.base_weights import BASE_REWRITES_NAME
from lora_cli.adapters.mixed import BASE_ADAPTER
from lora_cli.devices import model_device, model_dtype
from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.recipe import load_recipe
from lora_cli.serve.errors import RequestError, bad_request
from lora_cli.serve.streams import Row
from lora_cli.task_kinds import CAUSAL_LM, IMAGE_CLASSIFICATION, SEQ_CLS
from lora_cli.tasks.data.images import ImageLoadError, load_image
from lora_cli.tasks.image_classification import eval_pixels

logger = logging.getLogger(__name__)

KINDS = {IMAGE_CLASSIFICATION: "image", SEQ_CLS: "text", CAUSAL_LM: "generate"}
"""The tasks served and what their requests carry; seq2seq runs answer through ``predict --text``."""


@dataclass(eq=False)
class Group:
    """One model in memory: a base and the adapters of the runs that share it."""

    name: str
    model: Any
    runs: list[str] = field(default_factory=list)


@dataclass(eq=False)
class ServedRun:
    """A run as the server knows it: its name (the API's ``model``), its model and its card."""

    name: str
    run_dir: Path
    task: str
    method: str
    base: str
    labels: list[str] | None
    group: Group
    adapter: str
    mixable: bool
    processor: Any
    context: int | None
    card: dict[str, Any]
    plots: dict[str, Path]

    @property
    def kind(self) -> str:
        return KINDS[self.task]

    def batch_key(self, item: Any) -> tuple:
        """Rows with equal keys run in one forward: same shape of input, and either any
        mixable adapter of the group or this very run."""
        if isinstance(item, torch.Tensor):
            shape: tuple = tuple(item.shape)
        else:  # token ids: padded with the tokenizer's id, on its side
            shape = (getattr(self.processor, "pad_token_id", None), getattr(self.processor, "padding_side", None))
        return (self.group.name, "mixed" if self.mixable else self.adapter, shape)

    def describe(self) -> dict[str, Any]:
        """The run in ``/v1/models``."""
        return {"task": self.task, "method": self.method, "base": self.base, "labels": self.labels,
                "context_length": self.context, "shares_base_with": [r for r in self.group.runs if r != self.name],
                "mixed_batches": self.mixable}


# ------------------------------------------------------------------ loading
class Backend:
    """The runs being served, by name."""

    def __init__(self, runs: dict[str, ServedRun], groups: list[Group]) -> None:
        self.runs = runs
        self.groups = groups

    @classmethod
    def load(cls, named_dirs: Sequence[tuple[str, Path]], device: str | None = None) -> Backend:
        """Load every run (``(name, run_dir)``), runs with the same base on one model."""
        keys = {name: base_key(run_dir) for name, run_dir in named_dirs}
        groups: dict[Any, Group] = {}
        runs: dict[str, ServedRun] = {}
        for index, (name, run_dir) in enumerate(named_dirs):
            key = keys[name]
            group = groups.get(key) if key is not None else None
            adapter = f"run{index}"  # engine names stay ours: a run may be called anything, "default" too
            if group is None:
                loaded = load_run(run_dir, device=device, adapter_name=adapter)
                group = Group(f"base{len(groups)}", loaded.model)
                groups[key if key is not None else ("own", name)] = group
            else:
                loaded = load_run(run_dir, device=device, into=group.model, adapter_name=adapter)
            if loaded.recipe.task not in KINDS:
                raise UserInputError(f"{run_dir} is a {loaded.recipe.task} run; serve takes image-classification, "
                                     "seq-cls and causal-lm runs (use `loracli predict --text` for seq2seq)")
            group.runs.append(name)
            runs[name] = _served(name, run_dir, loaded, group, adapter)
        for run in runs.values():
            run.mixable = mixable(run.group.model, run.adapter)
        return cls(runs, list(groups.values()))

    # -------------------------------------------------------------- inputs
    def image_input(self, run: ServedRun, data: bytes) -> torch.Tensor:
        """An uploaded image as ``predict`` prepares it (decoder, eval resize / crop / normalise)."""
        try:
            image = load_image(data)
        except ImageLoadError as exc:
            raise bad_request(f"the image cannot be used: {exc.reason}", "invalid_image", "image") from None
        return eval_pixels(run.processor, image)

    def text_input(self, run: ServedRun, text: str, pair: str | None = None) -> dict[str, list[int]]:
        """Token ids as ``predict --text`` makes them, refused past the model's positions."""
        encoded = dict(run.processor(text, pair, truncation=True))
        encoded.pop("attention_mask", None)
        self._check_context(run, len(encoded["input_ids"]), 0, "text")
        return encoded

    def prompt_ids(self, run: ServedRun, prompt: str) -> list[int]:
        return list(run.processor(prompt)["input_ids"])

    def chat_ids(self, run: ServedRun, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template when it has one; otherwise ``role: content`` lines
        and an ``assistant:`` line to continue."""
        tokenizer = run.processor
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.prompt_ids(run, text)

    def check_prompt(self, run: ServedRun, n_prompt: int, max_tokens: int) -> None:
        if n_prompt == 0:
            raise bad_request("the prompt is empty once tokenized; give some text", "empty_prompt", "prompt")
        self._check_context(run, n_prompt, max_tokens, "prompt")

    @staticmethod
    def _check_context(run: ServedRun, n_input: int, n_new: int, param: str) -> None:
        if run.context is not None and n_input + n_new > run.context:
            asked = f"{n_input} in the {param}" + (f" + {n_new} max_tokens" if n_new else "")
            raise RequestError(400, f"this model's context is {run.context} tokens; the request needs {asked}. "
                               "Shorten the input" + (" or lower max_tokens" if n_new else ""),
                               "context_length_exceeded", param)

    def decode(self, run: ServedRun, ids: list[int]) -> str:
        return run.processor.decode(ids, skip_special_tokens=True)

    def eos_ids(self, run: ServedRun) -> frozenset[int]:
        found = {run.processor.eos_token_id}
        configured = getattr(getattr(run.group.model, "generation_config", None), "eos_token_id", None)
        found.update(configured if isinstance(configured, list) else [configured])
        return frozenset(i for i in found if i is not None)

    # ---------------------------------------------------------- computing
    def classify(self, runs: Sequence[ServedRun], items: Sequence[Any]) -> list[torch.Tensor]:
        """Class probabilities (float32, CPU) per row; ``runs[i]`` is row ``i``'s run. All rows
        share one :meth:`ServedRun.batch_key`."""
        model, first = runs[0].group.model, runs[0]
        if first.kind == "image":
            batch = {"pixel_values": torch.stack(list(items)).to(model_device(model), model_dtype(model))}
        else:
            batch = first.processor.pad([dict(i) for i in items], return_tensors="pt").to(model_device(model))
        with torch.inference_mode(), _adapters(runs) as names:
            logits = model(**batch, adapter_names=names).logits if names else model(**batch).logits
        probs = logits.float().softmax(dim=-1).cpu()
        finite = torch.isfinite(probs).all(dim=-1)
        return [p if ok else None for p, ok in zip(probs, finite.tolist())]

    def generate(self, runs: Sequence[ServedRun], rows: Sequence[Row]) -> None:
        """Continue every row's prompt (left-padded into one batch) until each row has stopped."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        model, tokenizer = runs[0].group.model, runs[0].processor
        width = max(len(r.prompt_ids) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
        device = model_device(model)
        with torch.inference_mode(), _adapters(runs, {"input_ids": ids}) as _:
            model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                max_new_tokens=max(r.max_tokens for r in rows), do_sample=False,
                logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([_RowStops(rows)]),
            )
        for row in rows:
            row.close()


def _served(name: str, run_dir: Path, loaded: Any, group: Group, adapter: str) -> ServedRun:
    recipe, model = loaded.recipe, loaded.model
    labels = [loaded.id2label[i] for i in sorted(loaded.id2label)] if loaded.id2label else None
    config = model.peft_config[adapter]
    plots = {p.name: p for p in sorted((run_dir / rd.PLOTS_DIR).glob("*.png")) if p.is_file()}
    card = {"run_dir": str(run_dir), "eval": _eval_numbers(run_dir / rd.EVAL_FILE), "plots": sorted(plots),
            "recipe_name": recipe.name, "options": {k: v for k, v in config.to_dict().items()
                                                    if k in ("r", "lora_alpha", "alpha", "target_modules", "init_r")}}
    context = None
    if recipe.task != IMAGE_CLASSIFICATION:
        config_len = [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits = [v for v in config_len if isinstance(v, int) and v > 0]
        context = min(limits) if limits else None
    return ServedRun(name=name, run_dir=run_dir, task=recipe.task, method=config.method, base=_base_label(recipe, run_dir),
                     labels=labels, group=group, adapter=adapter, mixable=False, processor=loaded.processor,
                     context=context, card=card, plots=plots)


def _base_label(recipe: Any, run_dir: Path) -> str:
    if recipe.model.name_or_path:
        revision = f"@{recipe.model.revision}" if recipe.model.revision else ""
        return f"{recipe.model.name_or_path}{revision}"
    model_type = (recipe.model.config or {}).get("model_type", "model")
    return f"random-init {model_type} from model.config ({run_dir.name}/{rd.BASE_MODEL_DIR})"


def _eval_numbers(path: Path) -> dict[str, float]:
    """The top-level numbers of a run's eval.json (accuracy, f1_macro, perplexity, ...)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(report, dict):
        return {}
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def base_key(run_dir: Path) -> tuple | None:
    """What must be equal for two runs to share one model (None: this run gets its own)."""
    recipe_file, adapter_dir = run_dir / rd.RECIPE_FILE, run_dir / rd.ADAPTER_DIR
    if not recipe_file.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        return None  # load_run says what is missing
    recipe = load_recipe(recipe_file)
    config = AdapterConfig.from_pretrained(adapter_dir)
    if get_method(config.peft_type).model_cls is not None or (adapter_dir / BASE_REWRITES_NAME).is_file():
        return None
    labels = rd.read_label_map(adapter_dir)
    model = recipe.model
    base_dir = run_dir / rd.BASE_MODEL_DIR
    if base_dir.is_dir():
        identity: tuple = ("weights", _folder_digest(base_dir))
    else:
        path = Path(model.name_or_path or "").expanduser()
        where = str(path.resolve()) if path.exists() else model.name_or_path
        identity = ("pretrained", where, model.revision, model.trust_remote_code)
    quantization = model.quantization.model_dump() if model.quantization else None
    return (recipe.task, config.method, len(labels or {}), identity, json.dumps(quantization, sort_keys=True))


def _folder_digest(folder: Path) -> str:
    """SHA-256 over a saved model's weights and its config (labels and versions left out)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for key in ("id2label", "label2id", "transformers_version", "_name_or_path"):
            config.pop(key, None)
        digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()


def mixable(model: Any, adapter: str) -> bool:
    """Whether rows of ``adapter`` can share a forward with other adapters' rows."""
    if not hasattr(model, "mixed_batch") or len(getattr(model, "peft_config", {})) < 2:
        return False
    return all(layer.mixed_batch_refusal([adapter]) is None for _, layer in model.adapter_layers() if adapter in layer.r)


@contextlib.contextmanager
def _adapters(runs: Sequence[ServedRun], inputs: dict | None = None):
    """Route the rows: yields the per-row adapter names for a mixed batch (entered for
    generation, which calls the model itself), or None after activating the rows' one adapter."""
    model = runs[0].group.model
    names = [r.adapter for r in runs]
    if len(set(names)) == 1:
        if model.active_adapters != [names[0]]:
            model.set_adapter(names[0])
        yield None
    elif inputs is None:
        yield names
    else:
        with model.mixed_batch(names, (), inputs):
            yield names


class _RowSampler:
    """A logits processor that picks each row's next token itself (greedy rows: left as they
    are), so one batch holds rows with their own temperature, top_p and seed; ``generate``
    then runs greedy and takes the token picked here."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows
        self.generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(self.rows):
            if row.greedy or row.finished:
                continue
            probs = (scores[i].float() / row.temperature).softmax(-1).cpu()
            if row.top_p < 1:
                ordered, order = probs.sort(descending=True)
                drop = ordered.cumsum(-1) - ordered > row.top_p  # keep the smallest set reaching top_p
                probs[order[drop]] = 0
            token = int(torch.multinomial(probs, 1, generator=self.generators[i]))
            scores[i] = float("-inf")
            scores[i, token] = 0
        return scores


class _RowStops:
    """A stopping criterion that feeds each row its new token; a row is done once it says so."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        done = [row.push(token) for row, token in zip(self.rows, last)]
        return torch.tensor(done, device=input_ids.device)


def decode_base64_image(value: str) -> bytes:
    """A base64 string, or a ``data:image/...;base64,`` URL, as bytes."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image is not valid base64 (send the file's bytes base64-encoded, or upload it as "
                          "multipart/form-data)", "invalid_base64", "image") from None


__all__ = ["BASE_ADAPTER", "Backend", "Group", "ServedRun", "base_key", "decode_base64_image", "mixable"]
