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


def _epochs(callback, losses_per_epoch, accuracies=()):
    """Feed ``callback`` the logged losses of each epoch (and an evaluation after each, if given)."""
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True)
    for index, losses in enumerate(losses_per_epoch):
        for i, loss in enumerate(losses):
            state.epoch = index + (i + 1) / len(losses)
            callback.on_log(None, state, None, logs={"loss": loss})
        state.epoch = float(index + 1)
        callback.on_epoch_end(None, state, None)
        if index < len(accuracies):
            callback.on_evaluate(None, state, None, metrics={"eval_accuracy": accuracies[index]})
    return state


def test_learning_check_warns_once_for_a_loss_at_chance(tmp_path, recwarn):
    """The issue's run (loss 2.48, then 2.31 on 10 classes, accuracy 0.097, then 0.103): one
    warning after epoch 2, naming the rate and the fix, and the same line in status.json."""
    import json

    from lora_cli.rundir import write_status
    from lora_cli.training.callbacks import LearningCheckCallback

    write_status(tmp_path, "running")
    check = LearningCheckCallback(10, 5e-3, tmp_path, hint=None)
    _epochs(check, [[2.6, 2.48], [2.35, 2.31], [2.32, 2.30]], accuracies=[0.097, 0.103, 0.1])
    lines = [str(w.message) for w in recwarn.list if "not learning" in str(w.message)]
    assert len(lines) == 1
    assert "training loss 2.310 after epoch 2 is at or above chance level (ln 10 = 2.303)" in lines[0]
    assert "learning rate 0.005 is likely too high" in lines[0] and "loracli tune" in lines[0]
    assert json.loads((tmp_path / "status.json").read_text())["not_learning"] == lines[0]


def test_learning_check_sees_a_rising_loss_and_chance_accuracy(recwarn):
    from lora_cli.training.callbacks import LearningCheckCallback

    rising = LearningCheckCallback(10, 1.0)
    _epochs(rising, [[2.0, 1.2], [1.5, 1.6]])
    assert "training loss rose from 1.200 to 1.600 in epoch 2" in str(recwarn.pop(UserWarning).message)

    at_chance = LearningCheckCallback(4, 1e-2, hint="the shipped recipe recipes/x.yaml uses 0.0005 for this model")
    _epochs(at_chance, [[1.3, 1.1], [1.0, 0.9]], accuracies=[0.2, 0.3])  # loss below ln 4, accuracy at 1/4
    message = str(recwarn.pop(UserWarning).message)
    assert "evaluation accuracy 0.300 at epoch 2 is at chance level (0.250 for 4 classes)" in message
    assert "recipes/x.yaml uses 0.0005" in message


def test_learning_check_is_quiet_while_learning_and_in_the_first_epoch(recwarn):
    """A run still at chance in its first epoch (a random start) and learning after it: no warning.
    A one-epoch run is judged by its final evaluation alone."""
    from lora_cli.training.callbacks import LearningCheckCallback

    learning = LearningCheckCallback(10, 1e-2)
    _epochs(learning, [[2.5, 2.32], [2.1, 1.9], [1.7, 1.5]], accuracies=[0.11, 0.42, 0.46])
    assert not [w for w in recwarn.list if "not learning" in str(w.message)]

    one_epoch = LearningCheckCallback(10, 1e-2)
    state = _epochs(one_epoch, [[2.6, 2.4]], accuracies=[0.1])
    assert not [w for w in recwarn.list if "not learning" in str(w.message)]
    one_epoch.on_train_end(None, state, None)
    one_epoch.on_evaluate(None, state, None, metrics={"eval_accuracy": 0.1})
    assert "evaluation accuracy 0.100 at epoch 1" in str(recwarn.pop(UserWarning).message)

    smoke = LearningCheckCallback(10, 1e-2)  # max_steps=6 of a 45-step epoch: too short to judge
    state.epoch = 0.133
    smoke.on_train_end(None, state, None)
    smoke.on_evaluate(None, state, None, metrics={"eval_accuracy": 0.1})
    assert not [w for w in recwarn.list if "not learning" in str(w.message)]
