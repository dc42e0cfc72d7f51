"""One table of tasks (``task_kinds``), one interface (``tasks.Task``), one data section each."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe.data import DATA_SECTIONS
from lora_cli.task_kinds import TASK_KINDS
from lora_cli.tasks import Task, get_task


@pytest.mark.parametrize("name", sorted(TASK_KINDS))
def test_every_task_module_implements_the_interface(name):
    task = get_task(name)
    assert isinstance(task, Task)
    assert task.KIND is TASK_KINDS[name]
    # the functions take sections, not the whole recipe
    for fn in (task.load_raw, task.prepare, task.eval_dataset):
        assert "recipe" not in inspect.signature(fn).parameters, fn
    assert list(inspect.signature(task.load_raw).parameters) == ["data", "seed"]
    assert list(inspect.signature(task.build_model).parameters)[0] == "model"


def test_every_task_has_its_data_section():
    assert set(DATA_SECTIONS) == set(TASK_KINDS)
    assert all(name == cls.TASK for name, cls in DATA_SECTIONS.items())


def test_an_unknown_task_names_the_choices():
    with pytest.raises(UserInputError, match="choose one of image-classification, causal-lm"):
        get_task("image-generation")


SYNTHETIC_PREDICTIONS = {  # (predictions as the Trainer hands them to compute_metrics, label_ids)
    "image-classification": (np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 1, 0])),
    "seq-cls": (np.eye(2)[[0, 1, 1]], np.array([0, 1, 0])),
    "causal-lm": (np.array([[2.0, 3.0], [1.0, 2.0]]), np.zeros((2, 4), dtype=int)),  # (summed NLL, count) per row
    "seq2seq": (np.array([[1, 2, 3]]), np.array([[1, 2, -100]])),
}


@pytest.mark.parametrize("name", sorted(TASK_KINDS))
def test_the_declared_metric_names_are_what_the_task_computes(name):
    """tune --metric and training.metric_for_best_model are checked against KIND.metrics before any work:
    the declaration must name exactly what the task's compute_metrics (plus the Trainer's loss) reports."""
    from transformers import EvalPrediction

    task = get_task(name)
    predictions, labels = SYNTHETIC_PREDICTIONS[name]
    computed = task.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
    assert {"loss", *computed} == set(task.KIND.metrics)
    assert not set(task.KIND.final_metrics) & set(task.KIND.metrics)
