"""The Trainer callbacks on their own: train.json's record."""

from __future__ import annotations

from types import SimpleNamespace

from lora_cli.training.callbacks import TrainStatsCallback


def test_train_json_is_kept_when_a_resume_trains_no_step(tmp_path):
    """A run resumed at its last step (its final evaluation had failed) trains nothing: its
    record of the training it did stays, instead of 0 steps and 0 samples/s."""
    record = tmp_path / "train.json"
    stats = TrainStatsCallback(tmp_path, n_train=10, samples_per_step=2)
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True)
    stats.on_train_begin(None, state, None)
    state.global_step, state.epoch = 5, 1.0
    stats.on_train_end(None, state, None)
    first = record.read_bytes()
    assert b'"optimizer_steps": 5' in first
    resumed = TrainStatsCallback(tmp_path, n_train=10, samples_per_step=2)
    resumed.on_train_begin(None, state, None)
    resumed.on_train_end(None, state, None)
    assert record.read_bytes() == first
