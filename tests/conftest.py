"""Shared fixtures: tiny models from configs, images the tests make, fixed seeds.

No test touches a hub: the environment says offline before transformers is imported.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_DATASETS_CACHE" not in os.environ:  # the decode caches tests build stay out of the user's cache
    _datasets_cache = tempfile.mkdtemp(prefix="loracli-tests-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _datasets_cache
    atexit.register(shutil.rmtree, _datasets_cache, ignore_errors=True)
if "LORACLI_CACHE" not in os.environ:  # packaged models the tests convert stay out of the user's cache too
    _loracli_cache = tempfile.mkdtemp(prefix="loracli-tests-cache-")
    os.environ["LORACLI_CACHE"] = _loracli_cache
    atexit.register(shutil.rmtree, _loracli_cache, ignore_errors=True)

import numpy as np
import pytest
import torch

# Two pytest-xdist workers on two cores: one torch thread each. More threads oversubscribe
# the cores and run several times slower, not faster.
torch.set_num_threads(int(os.environ.get("LORACLI_TEST_THREADS", "1")))

from tests.helpers import make_imagefolder  # noqa: E402 - after the offline env vars


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def imagefolder(tmp_path):
    """train/ and validation/ sub-folders, 3 classes of visibly different 32x32 images."""
    return make_imagefolder(tmp_path / "images")
