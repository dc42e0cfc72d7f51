"""What `loracli train` prints while it works, read as a log file would hold it: through a
pipe (not a terminal), 80 columns. One display per real phase, no carriage-return frames, no
bars for datasets' internal steps, every line within the width, a time left while training."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from lora_cli.progress import Field, LiveLine, Phase, counted, fit
from lora_cli.training.callbacks import RichProgressCallback
from tests.helpers_text import TINY_CONFIGS, make_tokenizer, prompt_rows, write_jsonl
from tests.helpers_text import write_recipe as write_text_recipe
from tests.training._util import write_recipe

ROOT = Path(__file__).resolve().parents[2]
DATASETS_STEPS = ("Flattening", "Casting", "dropping rows", "examples/s", "Map:", "Filter:")


def _train_into_a_pipe(recipe: Path, width: int = 80) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(width), "OMP_NUM_THREADS": "1"}
    env.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    done = subprocess.run([sys.executable, "-m", "lora_cli", "train", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)
    err = done.stderr.decode("utf-8")  # bytes: text mode would turn a "\r" into a line break
    assert done.returncode == 0, err
    return err


def _readable_log(err: str, width: int = 80) -> list[str]:
    assert "\r" not in err, "carriage-return frames in the log"
    assert not [s for s in DATASETS_STEPS if s in err], err
    lines = err.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    return lines


def test_image_training_log_at_80_columns(tmp_path, imagefolder):
    training = {"max_steps": 6, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 3,
                "per_device_train_batch_size": 4}
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training=training)
    lines = _readable_log(_train_into_a_pipe(recipe))
    # each split's decoding is one phase: a start line and an end line
    decoding = [line for line in lines if line.startswith("decoding images")]
    assert len(decoding) == 4 and sum("done," in line for line in decoding) == 2, lines
    train = [line for line in lines if line.startswith("train")]
    assert train[0] == "train: 6 steps of 4 images", train
    middle = [line for line in train if line.startswith("train 3/6")]  # the evaluation at step 3
    assert middle and "eta " in middle[0] and "eta ?" not in middle[0] and "acc " in middle[0], train
    assert train[-1].startswith("train 6/6") and "loss " in train[-1] and "images/s" in train[-1], train


def test_text_training_log_has_no_datasets_bars(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    recipe = write_text_recipe(tmp_path / "recipe.yaml", task="causal-lm",
                               model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok)},
                               data={"train_file": str(tmp_path / "train.jsonl"), "max_length": 32})
    lines = _readable_log(_train_into_a_pipe(recipe))
    assert sum(line.startswith("tokenizing") for line in lines) in (2, 4), lines  # start + end, per split
    assert any(line.startswith("train 4/4") for line in lines), lines


# ------------------------------------------------------------------ the pieces
def _console(width: int, terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=terminal, color_system=None), out


def test_fit_drops_the_least_kept_fields_first():
    fields = [Field("train", 0), Field("135/270", 0), Field("", 7, bar=0.5), Field("3:12", 2), Field("eta 3:10", 1),
              Field("loss 0.0914", 3), Field("lr 4.0e-05", 6), Field("acc 0.956", 4), Field("22.6 images/s", 5)]
    wide = fit(fields, 120).plain
    assert wide.startswith("train 135/270 ━") and wide.endswith("3:12 eta 3:10 loss 0.0914 lr 4.0e-05 acc 0.956 "
                                                                 "22.6 images/s")
    assert fit(fields, 80).plain == "train 135/270 3:12 eta 3:10 loss 0.0914 lr 4.0e-05 acc 0.956 22.6 images/s"
    assert fit(fields, 60).plain == "train 135/270 3:12 eta 3:10 loss 0.0914 acc 0.956"
    assert fit(fields, 30).plain == "train 135/270 3:12 eta 3:10"
    assert fit(fields, 20).plain == "train 135/270"


def test_training_line_off_a_terminal_prints_start_evaluations_and_end(monkeypatch):
    from types import SimpleNamespace

    console, out = _console(80)
    callback = RichProgressCallback(console, samples_per_step=32, unit="images", every=3600)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=270)
    callback.on_train_begin(None, state, None)
    for step in range(1, 46):
        state.global_step = step
        callback.on_step_end(None, state, None)  # within `every`: nothing printed
    callback.on_log(None, state, None, logs={"loss": 0.5, "learning_rate": 1e-2})
    callback.on_log(None, state, None, logs={"eval_accuracy": 0.81, "eval_loss": 0.6})
    state.global_step = 270
    callback.on_train_end(None, state, None)
    callback.close()  # a second close (the pipeline's, after an exception) prints nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == "train: 270 steps of 32 images"
    assert lines[1].startswith("train 45/270 ") and "eta " in lines[1] and "acc 0.810" in lines[1]
    assert lines[2].startswith("train 270/270 ") and "loss 0.5000" in lines[2]


def test_phase_off_a_terminal_is_two_lines_and_nothing_when_cached():
    console, out = _console(80)
    with Phase("decoding images (18x18)", total=10, unit="images", console=console):
        step = counted(lambda batch: batch, batched=True)
        step([1, 2, 3])
        step([4] * 7)
    lines = out.getvalue().splitlines()
    assert lines[0] == "decoding images (18x18): 10 images ..." and lines[1].startswith(
        "decoding images (18x18): done, 10 of 10 images in "), lines
    console, out = _console(80)
    with Phase("tokenizing", total=10, unit="rows", console=console):
        pass  # datasets served it from its cache: the function never ran
    assert out.getvalue() == ""


def test_live_line_on_a_terminal_redraws_and_keeps_its_last_frame():
    console, out = _console(40, terminal=True)
    line = LiveLine(lambda: [Field("train", 0), Field("1/2", 0)], console)
    line.open("never printed on a terminal")
    line.note(force=True)
    line.close()
    assert "never printed" not in out.getvalue() and "train 1/2" in out.getvalue()
