"""Old (transformers 4) names of a transformers 5 model's modules.

transformers 5 renamed many modules and keeps the renames in
``transformers.conversion_mapping`` to load old checkpoints. Recipes and PEFT adapters
written against the old names are everywhere (the Food-101 guide targets
``["query", "value"]``, now ``q_proj`` / ``v_proj`` in ViT). We run the model's renames
backwards on its current module paths to recover each module's old path; the adapter
engine then accepts targets and adapter keys written either way.

Only plain renames (literal text, no regex groups) are inverted; anything fancier is left
alone, which at worst means an old name is not recognised and the user gets the usual
"matched nothing" error listing the real names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from torch import nn

logger = logging.getLogger(__name__)

_LITERAL = re.compile(r"^\^?(?:[\w.]|\\\.)+$")


def _literal(pattern: str) -> str | None:
    if not _LITERAL.match(pattern):
        return None
    return pattern.lstrip("^").replace("\\.", ".")


def renames_for(model: nn.Module) -> list[tuple[str, str]]:
    """(old, new) literal renames that transformers applies when loading old checkpoints."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4: nothing was renamed
        return []
    try:
        transforms = get_model_conversion_mapping(model) or []
    except Exception as exc:  # the mapping API is young; never let it break targeting
        logger.debug("no conversion mapping for %s: %s", type(model).__name__, exc)
        return []
    pairs = []
    for transform in transforms:
        if type(transform).__name__ != "WeightRenaming":
            continue
        sources = getattr(transform, "source_patterns", None) or []
        targets = getattr(transform, "target_patterns", None) or []
        if len(sources) != 1 or len(targets) != 1:
            continue
        old, new = _literal(sources[0]), _literal(targets[0])
        if old and new and old != new:
            pairs.append((old, new))
    return pairs


def legacy_aliases(model: nn.Module, paths: Iterable[str]) -> dict[str, str]:
    """{current module path: its transformers-4 path} for the paths that were renamed."""
    pairs = renames_for(model)
    if not pairs:
        return {}
    out = {}
    for path in paths:
        old = "." + path + "."
        for before, after in reversed(pairs):
            old = old.replace("." + after.strip(".") + ".", "." + before.strip(".") + ".") if after.strip(".") else old
        old = old.strip(".")
        if old != path:
            out[path] = old
    return out


CLASSIFICATION_HEADS = ("classifier", "score", "head", "classification_head", "pre_classifier")
"""Top-level children of transformers' ``*ForImageClassification`` and
``*ForSequenceClassification`` models that hold the classification head: new weights,
sized for the recipe's labels, trained in full and saved beside the adapter."""


ALL_LINEAR_SKIPPED_HEADS = ("classifier", "score", "lm_head", "qa_outputs", "cls")
"""Top-level heads that ``target_modules: all-linear`` leaves alone (besides the model's
output embeddings): PEFT's sequence-classification heads (``classifier``, ``score``) and
the output layers of the LM, QA and pre-training heads. A task's other heads
(:data:`CLASSIFICATION_HEADS`) are in ``modules_to_save``, which all-linear skips too."""


TIMM_WRAPPER_CHILD = "timm_model"
"""The child of transformers' ``TimmWrapperForImageClassification`` that holds the timm model."""


def classification_heads(model: nn.Module) -> list[str]:
    """The paths of ``model``'s classification head modules, in model order: its top-level heads,
    or, for a timm model in transformers' wrapper, the module timm's ``get_classifier()`` returns
    (``timm_model.classifier`` for EfficientNet, ``timm_model.head`` for a ViT)."""
    heads = [name for name, _ in model.named_children() if name in CLASSIFICATION_HEADS]
    timm_model = getattr(model, TIMM_WRAPPER_CHILD, None)
    if heads or timm_model is None or not hasattr(timm_model, "get_classifier"):
        return heads
    head = timm_model.get_classifier()
    if isinstance(head, nn.Identity) or not any(True for _ in head.parameters()):
        return []
    path = next((name for name, module in timm_model.named_modules() if module is head and name), None)
    return [f"{TIMM_WRAPPER_CHILD}.{path}"] if path else []


def new_heads_line(model: nn.Module, loading_info: dict | None) -> str | None:
    """One line naming the head weights a ``from_pretrained(..., ignore_mismatched_sizes=True)``
    initialised from scratch (missing from the checkpoint, or of another size there), e.g.
    ``new head: classifier (768 -> 10 classes), initialised from scratch``; None when none were."""
    info = loading_info or {}
    sizes = {key: tuple(old) for key, old, _ in info.get("mismatched_keys") or ()}
    fresh = set(info.get("missing_keys") or ()) | set(sizes)
    if not fresh:
        return None
    modules = dict(model.named_modules())
    parts = []
    for path in dict.fromkeys(key.rsplit(".", 1)[0] for key in sorted(fresh)):
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            shape = f"{weight.shape[1]} -> {weight.shape[0]} classes"
            old = sizes.get(f"{path}.weight")
            replaced = f", replacing the checkpoint's {old[0]}-class head" if old else ""
            parts.append(f"{path} ({shape}{replaced})")
        else:
            parts.append(path)
    noun = "new head" if len(parts) == 1 else "new heads"
    return f"{noun}: {', '.join(parts)}, initialised from scratch"


DEFAULT_TARGETS = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "vit": ["query", "value"],
    "deit": ["query", "value"],
    "dinov2": ["q_proj", "v_proj"],
    "beit": ["q_proj", "v_proj"],
    "swin": ["q_proj", "v_proj"],
    "siglip": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
}
"""Default target modules per ``config.model_type``, for recipes that leave ``target_modules``
out: PEFT's table for the common text models, and for image models (which PEFT's lacks) the
attention's query and value projections the LoRA paper adapts; ConvNeXt's pointwise layers
(Linear in transformers). ViT / DeiT / BERT keep their transformers-4 names, which the engine's
aliases map to ``q_proj`` / ``v_proj``. timm models: :func:`timm_default_targets`."""

TIMM_ATTENTION = "qkv"
"""The fused query-key-value projection of timm's transformers (ViT, DeiT, BEiT, EVA, Swin)."""


def default_target_modules(model: nn.Module) -> list[str] | None:
    """The model's default target modules; None when loracli has none for it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    timm_model = getattr(model, TIMM_WRAPPER_CHILD, None)
    if timm_model is not None:
        return timm_default_targets(timm_model)
    targets = DEFAULT_TARGETS.get(model_type)
    return list(targets) if targets is not None else None


def timm_default_targets(timm_model: nn.Module) -> list[str] | None:
    """A timm model's defaults: a transformer's ``qkv`` (``proj``, ``fc1``, ``fc2`` are the user's
    to add), else a convnet's pointwise convolutions: the names of 1x1, ungrouped ``Conv2d``
    layers that name no other kind of layer (EfficientNet: ``conv_pw``, ``conv_pwl``,
    ``conv_head``); None when there are neither."""
    kinds: dict[str, set[bool]] = {}
    for path, module in timm_model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf == TIMM_ATTENTION and isinstance(module, nn.Linear):
            return [TIMM_ATTENTION]
        if not path or leaf.isdigit():
            continue
        pointwise = (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1)
        if isinstance(module, (nn.Conv2d, nn.Linear)) or leaf in kinds:
            kinds.setdefault(leaf, set()).add(pointwise)
    names = [leaf for leaf, seen in kinds.items() if seen == {True}]
    return names or None


POSITION_LIMIT_NAMES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
"""Config fields under which transformers models name their number of learned positions."""


def context_length(config: object) -> int | None:
    """How many token positions a model built from ``config`` has (its text config for multimodal
    ones), or None when it has no fixed limit (relative positions: T5) or does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in POSITION_LIMIT_NAMES:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
