"""The VQA tasks a model can be evaluated and calibrated on, selectable by name.

``easy-vqa`` is the dataset as published (the bundled model's task); ``mosaic`` is the 2x2-mosaic
task built from its labelled images (:mod:`qvlm.data.mosaic`, the second bundled model's task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qvlm.data import easy_vqa, mosaic


@dataclass(frozen=True)
class Task:
    """A task's question types (in report order) and its two fixed sample lists."""

    name: str
    question_types: tuple[str, ...]
    evaluation_subset: Callable[..., list]  # (limit=None, seed=0) -> test samples
    calibration_split: Callable[..., list]  # (n=64, seed=0) -> train samples


TASKS: dict[str, Task] = {
    "easy-vqa": Task("easy-vqa", easy_vqa.QUESTION_TYPES, easy_vqa.evaluation_subset, easy_vqa.calibration_split),
    "mosaic": Task("mosaic", mosaic.MOSAIC_QUESTION_TYPES, mosaic.mosaic_evaluation_subset,
                   mosaic.mosaic_calibration_split),
}
DEFAULT_TASK = "easy-vqa"

# Every registered question type, easy-VQA's first: what evaluation reports per type.
QUESTION_TYPES: tuple[str, ...] = tuple(t for task in TASKS.values() for t in task.question_types)


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the choices otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
