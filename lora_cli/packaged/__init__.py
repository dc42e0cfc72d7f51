"""Pretrained models that PyPI packages ship, as transformers folders: ``model.name_or_path: pypi:<dist>``.

One registry (``registry.py``), one converter module per source format (``dinov2_onnx.py``:
ONNX -> ``Dinov2Model``; ``timm_pth.py``: a ``.pth`` state dict -> a timm folder;
``gguf_llama.py``: GGUF -> a safetensors ``LlamaForCausalLM``), and the cache the converted
folders live in, built once per package version and verified (``cache.py``).
"""

from lora_cli.packaged.base import PIP_EXTRA, Packaged, VerificationError
from lora_cli.packaged.cache import cache_root
from lora_cli.packaged.registry import PYPI_PREFIX, REGISTRY, is_packaged, resolve

__all__ = ["PIP_EXTRA", "PYPI_PREFIX", "REGISTRY", "Packaged", "VerificationError", "cache_root", "is_packaged",
           "resolve"]
