"""Which module paths get adapters.

Rules (PEFT's, so recipes and adapter files mean the same thing in both tools):

- ``target_modules`` list: an entry matches a module whose path equals it or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- a string: a regular expression that must match the whole path;
- ``"all-linear"``: every Linear / Conv1D except the output layer and the classifier head;
- every module a list entry or a regex selects must be one the method can wrap: otherwise
  the call fails and names it (PEFT 0.21 raises too); nothing is left out silently;
- ``exclude_modules`` removes matches by the same rules;
- ``layers_to_transform`` keeps modules whose layer index (the number after
  ``layers_pattern``, or after any module-list name) is listed.

``aliases`` maps a module path to its older name (transformers 5 renamed many modules:
ViT's ``attention.attention.query`` is now ``attention.q_proj``); a rule that matches the
old name matches the module too, so recipes written for transformers 4 keep working.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from lora_cli.adapters import user_regex
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.kinds import HF_CONV1D, LINEAR, MHA
from lora_cli.adapters.layers import AdapterLayer, layer_kind
from lora_cli.errors import TargetingError, close_matches
from lora_cli.hf_names import ALL_LINEAR_SKIPPED_HEADS, legacy_aliases

ALL_LINEAR = "all-linear"
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
    if isinstance(rule, str):  # a user regex: matched with a time bound (user_regex)
        return any(user_regex.fullmatch(rule, name) for name in names)
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
    skip = {p for p in modules if p.split(".")[0] in ALL_LINEAR_SKIPPED_HEADS}
    get_out = getattr(model, "get_output_embeddings", None)
    out_module = get_out() if callable(get_out) else None
    if out_module is not None:
        skip |= {p for p, m in modules.items() if m is out_module}
    return skip


def resolve_targets(
    model: nn.Module,
    config: AdapterConfig,
    refusal: Callable[[nn.Module], str | None],
    aliases: Mapping[str, str] | None = None,
) -> list[str]:
    """Module paths to adapt, in model order.

    ``refusal(module)`` says why the method cannot wrap a module (None: it can). As in PEFT
    0.21, every module a list entry or a regex selects must be adaptable, or the whole call
    fails naming each one; nothing is dropped silently. "all-linear" picks only Linear /
    Conv1D layers (see :func:`_all_linear`).
    """
    modules = candidate_modules(model)
    rule = config.target_modules
    if rule is None:
        raise TargetingError(
            "target_modules is not set and there is no default for this model; "
            "list the modules to adapt, e.g. target_modules: [q_proj, v_proj], or use 'all-linear'"
        )
    skip_heads = set(config.modules_to_save or [])
    if rule == ALL_LINEAR or rule == [ALL_LINEAR]:
        selected = _all_linear(model, modules, skip_heads)
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
    refused = [(p, _mha_out_proj_refusal(modules, p) or refusal(modules[p])) for p in selected]
    refused = [(p, why) for p, why in refused if why]
    if refused:
        shown = "; ".join(f"{p} ({type(modules[p]).__name__}): {why}" for p, why in refused[:5])
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise TargetingError(
            f"target_modules {rule!r} selects module(s) the {config.method or 'adapter'} method cannot adapt: "
            f"{shown}{more}. Nothing was adapted; change target_modules, or add these paths to exclude_modules"
        )
    return selected


def _is_mha_out_proj(modules: Mapping[str, nn.Module], path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    return leaf == "out_proj" and layer_kind(modules.get(parent)) == MHA


def _mha_out_proj_refusal(modules: Mapping[str, nn.Module], path: str) -> str | None:
    if not _is_mha_out_proj(modules, path):
        return None
    parent = path.rpartition(".")[0]
    return (
        "it is the output projection of an nn.MultiheadAttention, whose forward reads its weight directly, "
        f"so an adapter on it alone would never run (PEFT 0.21 adapts it anyway, to no effect); target the "
        f"attention module itself ({parent!r}), which LoRA adapts as in_proj and out_proj together"
    )


def _all_linear(model: nn.Module, modules: Mapping[str, nn.Module], skip_heads: set[str]) -> list[str]:
    """PEFT's "all-linear": every Linear / Conv1D but the output layer and the heads.

    An nn.MultiheadAttention's ``out_proj`` is left out, with a warning: PEFT 0.21 adapts
    it, but the attention's forward never calls it, so that adapter has no effect.
    """
    heads = output_layer_paths(model, modules)
    selected, dead = [], []
    for path, module in modules.items():
        if layer_kind(module) not in (LINEAR, HF_CONV1D) or path in heads:
            continue
        if any(_matches_entry(path, h) for h in skip_heads):
            continue
        (dead if _is_mha_out_proj(modules, path) else selected).append(path)
    if dead:
        parents = ", ".join(p.rpartition(".")[0] for p in dead[:5])
        warnings.warn(
            f"target_modules 'all-linear' leaves out {', '.join(dead[:5])}: an nn.MultiheadAttention reads its "
            "out_proj weight directly, so an adapter there would do nothing (PEFT 0.21 adapts it anyway, to "
            f"no effect). To adapt the attention, list it in target_modules ({parents}) instead of 'all-linear'",
            stacklevel=4,
        )
    return selected


def _nothing_matched(rule, modules: Mapping[str, nn.Module], aliases) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if layer_kind(m) is not None})
    entries = [rule] if isinstance(rule, str) else list(rule)
    hints = []
    for entry in entries:
        close = close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
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
            close = close_matches(name, sorted({p.rsplit(".", 1)[-1] for p in modules}), n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise TargetingError(f"modules_to_save entry {name!r} matched no module of the model{hint}")
        out += hits
    # the outermost match wins, whichever entry named it first: a module inside another trained
    # copy is saved with it, not wrapped twice (two copies of one tensor: the checkpoint refuses them)
    out = list(dict.fromkeys(out))
    return [p for p in out if not any(p.startswith(o + ".") for o in out)]
