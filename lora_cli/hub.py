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
