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


def classification_heads(model: nn.Module) -> list[str]:
    """The names of ``model``'s top-level classification head modules, in model order."""
    return [name for name, _ in model.named_children() if name in CLASSIFICATION_HEADS]


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
