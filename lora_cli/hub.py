"""Fail fast when a recipe names a hub id the machine cannot reach.

transformers and datasets retry hub requests for a long time before giving up, and then
say little about what to do. We check once, up front: a local path is always fine; a hub
id is fine when its files are in the local cache or the hub answers a TCP connect within
a few seconds. Otherwise the user gets one message naming the key and the local options.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lora_cli.errors import UserInputError

logger = logging.getLogger(__name__)

_TRUTHY = {"1", "true", "yes", "on"}


def offline_by_env() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (HF_ENDPOINT honoured)."""
    if offline_by_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        logger.debug("hub %s unreachable: %s", endpoint, exc)
        return False


def _cached(repo_id: str, repo_type: str) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    folder = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if repo_type == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
        if any(datasets_cache.glob(f"{repo_id.replace('/', '___')}*")):
            return True
    return folder.is_dir() and any(folder.glob("snapshots/*/*"))


def require_hub(repo_id: str, key: str, repo_type: str = "model", local_hint: str = "") -> None:
    """Raise a clear UserInputError when ``repo_id`` (from recipe key ``key``) cannot be had.

    Local directories and files pass; so do hub ids that are cached or reachable.
    """
    if Path(repo_id).expanduser().exists():
        return
    if _cached(repo_id, repo_type) or hub_reachable():
        return
    why = "the hub is unreachable: offline mode is set (HF_HUB_OFFLINE)" if offline_by_env() else "the hub is unreachable from this machine"
    raise UserInputError(
        f"{key}: {repo_id!r} is not a local path and looks like a hub id, but {why} and it is not in the local cache. "
        f"{local_hint or 'Point it at a local directory instead.'}"
    )


def cached_snapshot(repo_id: str | None, revision: str | None = None) -> Path | None:
    """The hub cache's folder of ``repo_id`` at ``revision`` (a branch, tag or commit; default
    main) when it is there, found without a request; None for a local path or a repo not cached.

    A finished run loads its hub base from here: transformers, given the hub id, asks the Hub
    for every file again (and whether the repo holds an adapter) even when all are cached."""
    if not repo_id or Path(repo_id).expanduser().exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (ImportError, OSError, ValueError, LookupError) as exc:  # not cached (FileNotFoundError), not a repo id
        logger.debug("%s is not in the hub cache: %s", repo_id, exc)
        return None


class _KernelFetchOffline:
    """An import hook for ``bitsandbytes.backends.cpu.ops``: imported on a CPU with AVX512-BF16
    (as it is for every loracli command: transformers imports peft, which imports bitsandbytes),
    that module asks the ``kernels`` package for ``kernels-community/quantization-bitsandbytes``,
    which checks its publisher with the Hub and downloads it: network traffic, and code fetched
    from the Hub, from commands that read local files only. loracli keeps bitsandbytes' standard
    CPU layout (it never runs that kernel), so the module is imported with the Hub offline: a
    kernel already in the cache still loads, nothing is fetched."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path, target=None):
        if name != self.MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            from huggingface_hub import constants

            before = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True  # what kernels reads for local_files_only
            try:
                run(module)
            finally:
                constants.HF_HUB_OFFLINE = before

        spec.loader.exec_module = exec_module
        return spec


def keep_kernel_fetch_offline() -> None:
    """Install :class:`_KernelFetchOffline` (once, before bitsandbytes is imported)."""
    import sys

    if not any(isinstance(f, _KernelFetchOffline) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelFetchOffline())
