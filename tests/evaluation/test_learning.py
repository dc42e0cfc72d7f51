"""The chance levels the not-learning warning compares a run with."""

from __future__ import annotations

import math

import pytest

from lora_cli.evaluation import learning


def test_chance_levels():
    assert learning.chance_loss(10) == pytest.approx(math.log(10))
    assert learning.chance_accuracy(10) == pytest.approx(0.1)
    assert learning.chance_accuracy(2, majority=0.8) == pytest.approx(0.8)  # unbalanced: the majority class


@pytest.mark.parametrize(("accuracy", "classes", "majority", "expected"), [
    (0.103, 10, None, True), (0.15, 10, None, True), (0.16, 10, None, False),
    (0.55, 2, None, True), (0.56, 2, None, False),
    (0.82, 2, 0.8, True), (0.9, 2, 0.8, False),
    (0.014, 101, None, True), (0.03, 101, None, False),
])
def test_at_chance(accuracy, classes, majority, expected):
    assert learning.at_chance(accuracy, classes, majority) is expected


def test_loss_evidence():
    assert learning.loss_evidence(2, 2.31, 2.48, 10).startswith("training loss 2.310 after epoch 2 is at or above")
    assert learning.loss_evidence(3, 1.6, 1.2, 10) == "training loss rose from 1.200 to 1.600 in epoch 3"
    assert learning.loss_evidence(3, 1.21, 1.2, 10) is None  # noise, not a rise
    assert learning.loss_evidence(2, 0.9, 1.5, 10) is None
    assert learning.loss_evidence(4, 0.909, 0.755, 10) is None  # risen, but far below chance (ln 10 / 2)
    assert learning.epoch_loss([3.0, 2.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert learning.epoch_loss([]) is None
