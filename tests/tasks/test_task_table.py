"""One table of tasks (``task_kinds``), one interface (``tasks.Task``), one data section each."""

from __future__ import annotations

import inspect

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
