"""Packing: several tokenized rows per ``max_length`` sequence, with no attention across rows.

    rows       [a a a] [b b] [c c c c]           max_length 8
    packed     [a a a b b . . .] [c c c c . . . .]     (best fit, longest first)
    position   [0 1 2 0 1]       [0 1 2 3]             restart per row
    labels     [- a a - b]       [- c c c]             each row's first label -100

Each row keeps its own labels; the label of its first token becomes -100, since in a packed
sequence that token would be predicted from the previous row's last one (unpacked, it is never
predicted). Position ids restart at every row, and batches carry no 2-D attention mask and
``use_cache=False``: from position ids that restart, with no cache, transformers builds the
block-diagonal causal mask for eager / SDPA (``masking_utils.find_packed_sequence_indices``), so a
token attends only to its own row. (With a cache, which a forward in training mode makes unless told
not to, transformers ignores the restarts and rows would attend to each other.)
Flash attention detects packing only in a single flattened row (batch size 1), which
:func:`flattening` makes, as transformers' ``DataCollatorWithFlattening`` does. The loss over a
packed batch equals the loss over the same rows unpacked (tests/tasks/test_packing.py).
"""

from __future__ import annotations

import bisect
import inspect
from typing import Any

import torch

from lora_cli.errors import UserInputError

IGNORE_INDEX = -100


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of total length <= capacity: best fit, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, bin), sorted
    out: list[list[int]] = []
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(out)
            out.append([])
        out[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    return out


def pack(ds, max_length: int):
    """A dataset of packed rows (input_ids, labels, position_ids) from rows of input_ids and labels."""
    import datasets

    ids, labels = ds["input_ids"], ds["labels"]
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for group in bins([len(x) for x in ids], max_length):
        row_ids, row_labels, positions = [], [], []
        for i in sorted(group):  # the rows of a bin in data order
            row_ids += ids[i]
            row_labels += [IGNORE_INDEX] + list(labels[i][1:])
            positions += range(len(ids[i]))
        packed["input_ids"].append(row_ids)
        packed["labels"].append(row_labels)
        packed["position_ids"].append(positions)
    return datasets.Dataset.from_dict(packed)


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def collator(pad_token_id: int):
    """Rows -> a right-padded batch. Packed rows (with position_ids) get their position ids, padded
    with 0 so that each padding token is a sequence of its own, and no attention mask."""
    from lora_cli.tasks.data.text_common import pad_batch

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" not in batch[0]:
            return pad_batch(batch, pad_token_id)
        return {
            "input_ids": _pad([row["input_ids"] for row in batch], pad_token_id),
            "labels": _pad([row["labels"] for row in batch], IGNORE_INDEX),
            "position_ids": _pad([row["position_ids"] for row in batch], 0),
            "use_cache": False,  # transformers reads packing from position ids only without a cache
        }

    return collate


def flattening(collate):
    """``collate`` on one row that concatenates a batch's packed rows, unpadded: the form
    (``DataCollatorWithFlattening``'s) in which transformers' flash-attention path sees rows apart."""

    def flat(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" not in batch[0]:
            return collate(batch)
        return collate([{key: [v for row in batch for v in row[key]] for key in ("input_ids", "labels", "position_ids")}])

    return flat


def uses_flash_attention(model) -> bool:
    config = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def require_position_ids(model) -> None:
    """Packing needs a model whose forward takes position ids (learnt or rotary positions);
    ALiBi models (BLOOM, MPT) take none, and their rows could not be kept apart."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise UserInputError(
            f"data.packing: {type(base).__name__} takes no position ids, so packed rows could not be kept apart; "
            "set data.packing: false"
        )
