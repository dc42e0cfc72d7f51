"""Predicting from a run on this machine opens no network connection, online or not: a base
model named by hub id is read from the hub cache the run was trained from, and bitsandbytes'
import-time kernel fetch (on CPUs with AVX512-BF16) does not reach the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lora_cli import rundir as rd
from lora_cli.adapters import LoraConfig, get_adapter_model
from tests.helpers import CLASSES, class_image, make_imagefolder, tiny_vit
from tests.inference.runs_fixture import make_run
from tests.test_cli import AVX512_BF16_START

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# every connection or name lookup is recorded (with who asked) and refused, as on a machine
# whose network is down; the record is printed at exit for the test to read
NO_NETWORK = textwrap.dedent("""
    import atexit, socket, sys, traceback
    tried = []

    def refuse(what):
        def call(*args, **kwargs):
            frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]]
            tried.append(f"{what} {args[1:2] if what == 'connect' else args[:1]} from {' <- '.join(frames[-6:][::-1])}")
            raise OSError(101, "network is unreachable (test)")
        return call

    socket.socket.connect = refuse("connect")
    socket.create_connection = refuse("create_connection")
    socket.getaddrinfo = refuse("getaddrinfo")
    atexit.register(lambda: print("NETWORK ATTEMPTS: " + repr(tried), file=sys.stderr))
""")


def _hub_cached_run(tmp_path: Path) -> tuple[Path, Path]:
    """A hub cache holding ``me/tiny-vit`` (as a download leaves it) and a run trained on it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--tiny-vit" / "snapshots" / COMMIT
    base = tiny_vit(num_labels=len(CLASSES))
    base.save_pretrained(snapshot)
    (cache / "models--me--tiny-vit" / "refs").mkdir()
    (cache / "models--me--tiny-vit" / "refs" / "main").write_text(COMMIT)
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(snapshot)
    run = tmp_path / "run"
    make_imagefolder(tmp_path / "images")  # the data the run was trained on (predict reads none of it)
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
              "init_lora_weights": False}
    get_adapter_model(tiny_vit(num_labels=len(CLASSES)), LoraConfig(**fields)).save_pretrained(run / rd.ADAPTER_DIR)
    rd.save_label_map(run / rd.ADAPTER_DIR, dict(enumerate(CLASSES)))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(run / rd.PROCESSOR_DIR)
    recipe = {"name": "run", "task": "image-classification", "output_dir": str(run),
              "model": {"name_or_path": "me/tiny-vit"}, "data": {"imagefolder": str(tmp_path / "images")},
              "adapter": {"method": "lora", **{k: v for k, v in fields.items() if k != "init_lora_weights"}}}
    (run / rd.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    rd.write_json(run / rd.ENV_FILE, {"seed": 0})
    rd.write_status(run, "completed")
    return cache, run


@pytest.mark.parametrize("base", ["hub cache", "base_model folder"])
def test_predict_from_a_run_opens_no_connection(tmp_path, base):
    """``hub cache``: transformers asked the Hub for every file of a cached hub id (with retries).
    ``base_model folder`` (a run built from model.config): bitsandbytes' import checked the kernel's
    publisher with the Hub ("could not verify publisher trust status") and tried to download it."""
    import numpy as np

    if base == "hub cache":
        cache, run = _hub_cached_run(tmp_path)
    else:
        cache, run = tmp_path / "hub", make_run(tmp_path, "run", make_imagefolder(tmp_path / "images"))
    image = tmp_path / "one.png"
    class_image(1, np.random.default_rng(0)).save(image)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE")}  # online, as users are
    env.update(PYTHONPATH=str(ROOT), HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    start = NO_NETWORK + AVX512_BF16_START  # as on a CPU with AVX512-BF16, where bitsandbytes fetches a kernel
    done = subprocess.run([sys.executable, "-c", start, "--debug", "predict", str(image), "--run", str(run),
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert '"file"' in done.stdout and "one.png" in done.stdout
    assert "NETWORK ATTEMPTS: []" in done.stderr, done.stderr[-4000:]
