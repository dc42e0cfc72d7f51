"""Ctrl-C during `loracli train`: a real SIGINT to a real process. It exits promptly with 130
and one line naming the step, the checkpoint kept and the exact command that resumes the run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training._util import write_recipe

ROOT = Path(__file__).resolve().parents[2]


def _train_then_interrupt(recipe: Path, run: Path, overrides: list[str], wait_for_checkpoint: bool):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "lora_cli", "train", str(recipe), *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            logged = (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2
            saved = any((run / "checkpoints").glob("checkpoint-*"))
            if logged and (saved or not wait_for_checkpoint):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tmp_path, imagefolder):
    run = tmp_path / "my runs" / "tiny"  # a path the shell must quote
    training = {"max_steps": 100000, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "elsewhere", training=training)
    overrides = [f"output_dir={run}", "training.learning_rate=0.005"]
    code, err = _train_then_interrupt(recipe, run, overrides, wait_for_checkpoint=True)
    assert code == 130, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    line = lines[0]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] >= 2
    kept = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert f"interrupted at step {status['step']} of 100000" in line and f"{kept.name} is kept" in line
    command = line.split("resume with: ", 1)[1]
    assert shlex.split(command) == ["python", "-m", "lora_cli", "train", str(recipe), *overrides, "--resume"]
    assert shlex.quote(f"output_dir={run}") in command
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_the_next_run_starts_over(tmp_path, imagefolder):
    run = tmp_path / "run"
    training = {"max_steps": 100000, "save_strategy": "no", "logging_steps": 1}
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run, training=training)
    code, err = _train_then_interrupt(recipe, run, [], wait_for_checkpoint=False)
    assert code == 130, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "starts over" in lines[0], err
    command = lines[0].rsplit(": ", 1)[1]
    assert shlex.split(command) == ["python", "-m", "lora_cli", "train", str(recipe)]
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
