"""PEFT checkpoint key naming and the remapping of older key names.

File keys are ``base_model.model.<module path>.<tensor suffix>`` with the adapter name
removed (``...q_proj.lora_A.weight``). Two kinds of keys need translating on load:

- module paths from transformers 4 (``vit.encoder.layer.0.attention.attention.query``),
  renamed in transformers 5 (``vit.layers.0.attention.q_proj``);
- PEFT's redundant copies around ``modules_to_save`` (``X.modules_to_save.bias``,
  ``X.original_module.bias``) written with ``bias="all"``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

KEY_PREFIX = "base_model.model."


def remap_legacy_key(key: str, renamed: Mapping[str, str], wrappers: Collection[str]) -> str | None:
    """The current name of file key ``key``; None for a key that should be skipped.

    ``renamed`` maps old module paths to current ones; ``wrappers`` are the paths of
    modules_to_save wrappers.
    """
    if not key.startswith(KEY_PREFIX):
        return key
    rest = key[len(KEY_PREFIX) :]
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        new = renamed.get(".".join(parts[:i]))
        if new is not None:
            parts = new.split(".") + parts[i:]
            break
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in wrappers and parts[i] in ("modules_to_save", "original_module"):
            if parts[i] == "original_module":
                return None
            tail = parts[i + 1 :]
            if len(tail) > 1 and tail[0] == "default":  # live-style names with the adapter name
                tail = tail[1:]
            parts = parts[:i] + tail
            break
    return KEY_PREFIX + ".".join(parts)
