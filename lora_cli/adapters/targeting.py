"""Which module paths get adapters.

Rules (PEFT's, so recipes and adapter files mean the same thing in both tools):

- ``target_modules`` list: an entry matches a module whose path equals it or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a string: a regular expression that must match the whole path;
- ``"all-linear"``: every Linear / Conv1D except the output layer and the classifier head;
- ``exclude_modules`` removes matches by the same rules;
- ``layers_to_transform`` keeps modules whose layer index (the number after
  ``layers_pattern``, or after any module-list name) is listed.

``aliases`` maps a module path to its older name (transformers 5 renamed many modules:
ViT's ``attention.attention.query`` is now ``attention.q_proj``); a rule that matches the
old name matches the module too, so recipes written for transformers 4 keep working.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Mapping

from torch import nn

from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.layers import HF_CONV1D, LINEAR, AdapterLayer, layer_kind
from lora_cli.errors import TargetingError
from lora_cli.hf_names import legacy_aliases

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "cls")
"""Top-level heads that "all-linear" leaves alone: they are trained in full, if at all."""
INTERNAL_PARTS = ("base_layer", "original_module", "modules_to_save")
LAYER_LIST_NAMES = ("layers", "layer", "h", "blocks", "block")


def _matches_entry(path: str, entry: str) -> bool:
    return path == entry or path.endswith("." + entry)


def matches(path: str, rule: list[str] | str | None, aliases: Mapping[str, str] | None = None) -> bool:
    """Does ``rule`` (list of names / suffixes, or a full-match regex) select ``path``?"""
    if rule is None:
        return False
    names = [path]
    if aliases and path in aliases:
        names.append(aliases[path])
    if isinstance(rule, str):
        return any(re.fullmatch(rule, name) for name in names)
    return any(_matches_entry(name, entry) for name in names for entry in rule)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index after the layer list in ``path`` (``model.layers.3.mlp`` -> 3)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_LIST_NAMES)
    alternatives = "|".join(re.escape(p) for p in patterns)
    match = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _layer_index_any(path: str, layers_pattern, aliases: Mapping[str, str] | None) -> int | None:
    """layer_index under the current name, else under the transformers-4 name (a
    layers_pattern of "layer" written for ViT's old ``encoder.layer.N``)."""
    index = layer_index(path, layers_pattern)
    if index is None and aliases and path in aliases:
        index = layer_index(aliases[path], layers_pattern)
    return index


def _inside_any(path: str, names: Iterable[str], aliases: Mapping[str, str] | None) -> bool:
    """Is ``path`` one of the modules ``names`` (dot-boundary rules) or inside one?"""
    names = list(names)
    parts = path.split(".")
    return bool(names) and any(matches(".".join(parts[:i]), names, aliases) for i in range(1, len(parts) + 1))


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths of ``model`` as the user knows them (adapter internals hidden)."""
    out = {}
    for path, module in model.named_modules():
        if not path or any(part in INTERNAL_PARTS for part in path.split(".")):
            continue
        out[path] = module.base_layer if isinstance(module, AdapterLayer) else module
    return out


def module_aliases(model: nn.Module) -> dict[str, str]:
    """transformers-4 names of a transformers-5 model's modules (empty for other models)."""
    if "transformers" not in sys.modules or not hasattr(model, "config"):
        return {}
    return legacy_aliases(model, candidate_modules(model))


def output_layer_paths(model: nn.Module, modules: Mapping[str, nn.Module]) -> set[str]:
    """The output embedding and the classifier head: never targeted by "all-linear"."""
    skip = {p for p in modules if p.split(".")[0] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out_module = get_out() if callable(get_out) else None
    if out_module is not None:
        skip |= {p for p, m in modules.items() if m is out_module}
    return skip


def resolve_targets(
    model: nn.Module,
    config: AdapterConfig,
    supports,
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """Module paths to adapt, in model order. ``supports(module)`` says what can be wrapped."""
    modules = candidate_modules(model)
    rule = config.target_modules
    if rule is None:
        raise TargetingError(
            "target_modules is not set and there is no default for this model; "
            "list the modules to adapt, e.g. target_modules: [q_proj, v_proj], or use 'all-linear'"
        )
    skip_heads = set(config.modules_to_save or [])
    if rule == ALL_LINEAR or rule == [ALL_LINEAR]:
        heads = output_layer_paths(model, modules)
        selected = [
            p
            for p, m in modules.items()
            if layer_kind(m) in (LINEAR, HF_CONV1D) and p not in heads and not any(_matches_entry(p, h) for h in skip_heads)
        ]
    else:
        selected = [p for p in modules if matches(p, rule, aliases)]
    if not selected:
        raise TargetingError(_nothing_matched(rule, modules, aliases))

    if config.exclude_modules is not None:
        selected = [p for p in selected if not matches(p, config.exclude_modules, aliases)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        selected = [p for p in selected if _layer_index_any(p, config.layers_pattern, aliases) in wanted]
    # A module trained in full gets no adapter (PEFT's rule; PEFT saves "all-linear" as a
    # list of paths that includes the head it also lists in modules_to_save).
    selected = [p for p in selected if not _inside_any(p, skip_heads, aliases)]
    if not selected:
        raise TargetingError(
            f"target_modules {rule!r} matched modules, but exclude_modules / layers_to_transform / "
            "modules_to_save removed all of them"
        )

    # A rule that names a container (an attention block) rather than a layer is a mistake.
    unsupported = [p for p in selected if not supports(modules[p])]
    if isinstance(rule, list):
        selected = [p for p in selected if supports(modules[p])]
        if not selected:
            bad = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in unsupported[:5])
            if all(layer_kind(modules[p]) is not None for p in unsupported):
                fix = "this method has no adapter for these layer types; target other layers or use LoRA"
            else:
                fix = "name the Linear/Conv/Embedding layers inside them instead"
            raise TargetingError(f"target_modules {rule!r} matched only modules this method cannot adapt: {bad}; {fix}")
    else:
        selected = [p for p in selected if supports(modules[p])]
        if not selected:
            raise TargetingError(f"target_modules {rule!r} matched no layer this method can adapt")
    return selected


def _nothing_matched(rule, modules: Mapping[str, nn.Module], aliases) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if layer_kind(m) is not None})
    entries = [rule] if isinstance(rule, str) else list(rule)
    hints = []
    for entry in entries:
        close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
        if close:
            hints.append(f"{entry!r}: closest module names are {', '.join(close)}")
    text = f"target_modules {rule!r} matched no module of the model."
    if hints:
        text += " " + "; ".join(hints) + "."
    text += f" Adaptable layer names in this model: {', '.join(leaves[:20])}{' ...' if len(leaves) > 20 else ''}"
    return text


def resolve_modules_to_save(model: nn.Module, names: Iterable[str], aliases: Mapping[str, str] | None = None) -> list[str]:
    """Paths of modules_to_save entries, matched on a dot boundary (so "classifier" does
    not also hit "pre_classifier")."""
    modules = candidate_modules(model)
    out: list[str] = []
    for name in names:
        hits = [p for p in modules if matches(p, [name], aliases)]
        if not hits:
            close = difflib.get_close_matches(name, sorted({p.rsplit(".", 1)[-1] for p in modules}), n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise TargetingError(f"modules_to_save entry {name!r} matched no module of the model{hint}")
        # the outermost match wins: a wrapped head is saved whole, not its children twice
        for hit in hits:
            if not any(hit.startswith(o + ".") for o in out + hits if o != hit):
                out.append(hit)
    return list(dict.fromkeys(out))
