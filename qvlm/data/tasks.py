"""The VQA tasks a model can be evaluated and calibrated on, selectable by name.

``easy-vqa`` is the dataset as published (the bundled model's task); ``mosaic`` is the 2x2-mosaic
task built from its labelled images (:mod:`qvlm.data.mosaic`, the second bundled model's task).
``scienceqa-img`` and ``vqav2`` are the paper's hub benchmarks (:mod:`qvlm.data.hub`, Table 3): they
need ``datasets`` and the hub, so they are in :data:`HUB_TASKS`, not in :data:`TASKS`, which lists
what a model of this repository can be trained, evaluated and shown on offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qvlm.data import easy_vqa, hub, mosaic


@dataclass(frozen=True)
class Task:
    """A task's question types (in report order) and its fixed sample lists."""

    name: str
    question_types: tuple[str, ...]
    evaluation_subset: Callable[..., list]  # (limit=None, seed=0) -> test samples
    calibration_split: Callable[..., list]  # (n=64, seed=0) -> train samples
    holdout_split: Callable[..., list]  # (n, exclude_image_ids, seed=0) -> train samples on unseen images
    answers: Callable[[], list[str]]  # () -> every answer a question can have, sorted
    title: str = ""  # how reports name it in prose ("easy-VQA"); the name where empty
    score: Callable[[str, object], float] | None = None
    """(prediction, sample) -> credit in [0, 1]; None: exact match after normalization (``is_correct``)."""

    def test_size(self) -> int:
        """How many questions the fixed test split holds: the most a subset of it can draw."""
        return len(self.evaluation_subset())


TASKS: dict[str, Task] = {
    "easy-vqa": Task("easy-vqa", easy_vqa.QUESTION_TYPES, easy_vqa.evaluation_subset, easy_vqa.calibration_split,
                     easy_vqa.holdout_split, easy_vqa.answer_vocabulary, title="easy-VQA"),
    "mosaic": Task("mosaic", mosaic.MOSAIC_QUESTION_TYPES, mosaic.mosaic_evaluation_subset,
                   mosaic.mosaic_calibration_split, mosaic.mosaic_holdout_split, mosaic.mosaic_answers,
                   title="easy-VQA mosaic"),
}
DEFAULT_TASK = "easy-vqa"

HUB_TASKS: dict[str, Task] = {
    hub.SCIENCEQA: Task(hub.SCIENCEQA, hub.SCIENCEQA_SUBJECTS, hub.scienceqa_evaluation_subset,
                        hub.scienceqa_calibration_split, hub.scienceqa_holdout_split, hub.scienceqa_answers,
                        title="ScienceQA-IMG", score=hub.score_scienceqa),
    hub.VQAV2: Task(hub.VQAV2, hub.VQAV2_ANSWER_TYPES, hub.vqav2_evaluation_subset, hub.vqav2_calibration_split,
                    hub.vqav2_holdout_split, hub.vqav2_answers, title="VQAv2", score=hub.score_vqav2),
}

# Every registered question type, easy-VQA's first: what evaluation reports per type.
QUESTION_TYPES: tuple[str, ...] = tuple(t for task in TASKS.values() for t in task.question_types)


def get_task(name: str) -> Task:
    """The task called ``name`` (bundled or hub); ValueError naming the choices otherwise."""
    task = TASKS.get(name) or HUB_TASKS.get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join([*TASKS, *HUB_TASKS])}")
    return task


TASK_FILES = ("training_report.json", "qvlm_quant.json", "qvlm_activations.json")
"""Files of a model folder that may name its task: a training report, a Q-VLM packed export's
manifest, a compressed-tensors export's activation sidecar (all written by this project)."""


def recorded_task(folder: str | Path) -> str | None:
    """The task a local model folder says it was trained for: the ``"task"`` of its training report or
    export manifest (a bundled or a hub task); None when no file says.

    Why from the folder: calibration and evaluation must use the model's own task (a mosaic model
    calibrated on single easy-VQA images would see inputs it was never trained on), and an export
    must keep saying it (every writer of :mod:`qvlm.export` records the task).
    """
    for name in TASK_FILES:
        path = Path(folder) / name
        try:
            task = json.loads(path.read_text()).get("task") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            task = None
        if task in TASKS or task in HUB_TASKS:
            return task
    return None


def task_of_model_folder(folder: str | Path) -> str:
    """:func:`recorded_task`, or :data:`DEFAULT_TASK` for a folder that does not say."""
    return recorded_task(folder) or DEFAULT_TASK
