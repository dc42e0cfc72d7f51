"""What `cli.py` itself owns: third-party banners kept out of the output (shown with --debug)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bitsandbytes 0.50, on a CPU with AVX512-BF16, fetches a CPU kernel from the Hub through the
# `kernels` package when it is imported (the Trainer imports it through peft): offline, kernels
# warns that it skips the publisher trust check, then bitsandbytes that the kernel failed to load.
# This start-up makes `has_avx512bf16` true on any CPU so the real import path runs here.
AVX512_BF16_START = textwrap.dedent("""
    import importlib.abc, importlib.machinery, runpy, sys

    class AVX512BF16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AVX512BF16())
    sys.argv = ["loracli", *sys.argv[1:]]
    runpy.run_module("lora_cli", run_name="__main__", alter_sys=True)
""")

KERNEL_NOISE = ("kernels-community/quantization-bitsandbytes", "publisher trust", "gemm_4bit_forward")


def loracli_as_on_avx512bf16(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", AVX512_BF16_START, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bitsandbytes_kernel_warnings_only_with_debug():
    # a quantized base: validate probes bitsandbytes (a recipe without one imports neither it nor torch)
    quantized = "model.quantization={bits: 4}"
    done = loracli_as_on_avx512bf16("validate", "recipes/quickstart.yaml", quantized)
    assert done.returncode == 0, done.stderr
    assert "ok recipes/quickstart.yaml" in done.stderr
    assert not any(noise in done.stderr for noise in KERNEL_NOISE), done.stderr
    debug = loracli_as_on_avx512bf16("--debug", "validate", "recipes/quickstart.yaml", quantized)
    assert debug.returncode == 0, debug.stderr
    assert "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" in debug.stderr
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in debug.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_banner_records_of_the_real_loggers_need_debug(monkeypatch, capsys, debug):
    import logging

    from lora_cli import cli

    monkeypatch.setattr(sys, "argv", ["loracli", *(["--debug"] if debug else []), "validate",
                                      str(ROOT / "recipes" / "quickstart.yaml")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0
    capsys.readouterr()
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
        "Hub is in offline mode.")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "not cached")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else bitsandbytes says")
    err = capsys.readouterr().err
    assert ("publisher trust" in err) is debug and ("gemm_4bit_forward" in err) is debug, err
    assert "something else bitsandbytes says" in err  # its other warnings still reach the user
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if not getattr(h, "_loracli", False)]
