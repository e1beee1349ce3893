"""VQA data: the easy-VQA dataset, its 2x2-mosaic task, the paper's hub benchmarks, prompt format and scoring."""

from qvlm.data.easy_vqa import (
    COLORS,
    SHAPES,
    VQASample,
    answer_vocabulary,
    calibration_split,
    holdout_split,
    evaluation_subset,
    image_labels,
    load_image,
    load_split,
    question_type,
)
from qvlm.data.mosaic import MOSAIC_QUESTION_TYPES, MosaicSample
from qvlm.data.prompts import build_prompt, chat_messages, is_correct, normalize_answer, validate_question
from qvlm.data.tasks import DEFAULT_TASK, HUB_TASKS, QUESTION_TYPES, TASKS, Task, get_task, task_of_model_folder

__all__ = [
    "COLORS",
    "DEFAULT_TASK",
    "HUB_TASKS",
    "MOSAIC_QUESTION_TYPES",
    "MosaicSample",
    "QUESTION_TYPES",
    "SHAPES",
    "TASKS",
    "Task",
    "VQASample",
    "answer_vocabulary",
    "build_prompt",
    "calibration_split",
    "holdout_split",
    "chat_messages",
    "evaluation_subset",
    "get_task",
    "image_labels",
    "is_correct",
    "load_image",
    "load_split",
    "normalize_answer",
    "question_type",
    "task_of_model_folder",
    "validate_question",
]
