"""Reading adapter tensor files safely: ``adapter_model.safetensors``, PEFT's legacy
``adapter_model.bin`` (plain tensors only, ``weights_only=True``), and any other
safetensors file the engine keeps beside an adapter; damage is reported naming the file."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lora_cli.adapters.config import WEIGHTS_NAME
from lora_cli.errors import NonFiniteError, UserInputError

LEGACY_WEIGHTS_NAME = "adapter_model.bin"
"""PEFT's pre-safetensors format: a ``torch.save``-d dict of tensors (a pickle)."""

_RESAVE = (
    "re-save the adapter from the model that trained it (loracli train, or PEFT's "
    "save_pretrained(..., safe_serialization=True)), or train it again"
)


class AdapterFileError(UserInputError, ValueError):
    """An adapter weights file that cannot be read: truncated, corrupt, or not plain tensors."""


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of the adapter in ``directory``: ``adapter_model.safetensors``, else
    PEFT's legacy ``adapter_model.bin``.

    Nothing is ever unpickled beyond plain tensors and containers: a ``.bin`` is read
    only through ``torch.load(weights_only=True)`` (PEFT's own ``.bin`` files are plain
    tensor dicts and load), and anything else in it is refused, never retried unsafely.
    """
    directory = Path(directory)
    for file, read in ((directory / WEIGHTS_NAME, load_safetensors), (directory / LEGACY_WEIGHTS_NAME, load_torch_tensors)):
        if file.is_file():
            state = read(file)
            found = first_non_finite(state)
            if found is not None:
                raise AdapterFileError(
                    f"{file}: tensor {found[0]} holds {found[1]}; the adapter is damaged (its training diverged, or "
                    "the file was edited) and nothing computed from it would mean anything. Train it again, e.g. "
                    "with a lower training.learning_rate, or use an earlier checkpoint"
                )
            return state
    raise UserInputError(
        f"no {WEIGHTS_NAME} (nor PEFT's legacy {LEGACY_WEIGHTS_NAME}) in {directory}: the adapter's weights are "
        "missing; copy them next to its adapter_config.json, or train the adapter again"
    )


def load_safetensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with damage reported as a :class:`AdapterFileError`
    that names the file (truncated copies, zero-byte files, random bytes)."""
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AdapterFileError(
            f"{file}: truncated or corrupt safetensors file ({reason}); {_RESAVE}, "
            "or copy the file again if it was cut short in transfer"
        ) from None


def load_torch_tensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """A ``torch.save``-d dict of tensors, read with ``weights_only=True`` only.

    A file that needs anything more (arbitrary classes, code) is refused in our words:
    unpickling it could run code. A damaged file is reported as truncated or corrupt.
    """
    convert = (
        "re-create the weights as safetensors where the adapter was made: load the trained model there and "
        f"call save_pretrained(out_dir, safe_serialization=True), which writes {WEIGHTS_NAME} (tensors only)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for our users
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterFileError(
            f"{file}: refused: this pickled weights file holds more than plain tensors (or is corrupt), and "
            "loracli never unpickles such objects, because loading them can run code. If you trust its source, "
            f"{convert}; a PEFT adapter_model.bin that holds only tensors loads here as it is"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc).strip() else "the data ends early"
        raise AdapterFileError(
            f"{file}: truncated or corrupt PyTorch weights file ({type(exc).__name__}: {reason}); "
            f"{_RESAVE}, or copy the file again if it was cut short in transfer"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        found = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise AdapterFileError(
            f"{file}: not an adapter state dict (expected a mapping of tensor names to tensors, found {found}); "
            f"{_RESAVE}"
        )
    return state


def non_finite_count(tensor: Tensor) -> str | None:
    """``"3 NaN and 1 inf of 128 values"`` for a floating tensor holding any; None when all are finite."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = tensor.numel() - int(finite.sum()) - nan
    parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n]
    return f"{' and '.join(parts)} of {tensor.numel()} values"


def first_non_finite(tensors: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """(name, what) of the first tensor holding NaN or inf values, in the mapping's order; None when all are finite."""
    for name, tensor in tensors.items():
        found = non_finite_count(tensor)
        if found is not None:
            return name, found
    return None


def check_finite(tensors: Mapping[str, Tensor], what: str, fix: str) -> None:
    """Raise :class:`~lora_cli.errors.NonFiniteError` naming the first of ``tensors`` (computed, not read) that
    holds NaN or inf: ``what`` says what was computed, ``fix`` what to change."""
    found = first_non_finite(tensors)
    if found is not None:
        raise NonFiniteError(f"{what} came out non-finite: {found[0]} holds {found[1]}; {fix}; nothing written")
