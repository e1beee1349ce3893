"""VQA data: the easy-VQA dataset, prompt format and answer scoring."""

from qvlm.data.easy_vqa import (
    COLORS,
    QUESTION_TYPES,
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
from qvlm.data.prompts import build_prompt, chat_messages, is_correct, normalize_answer, validate_question

__all__ = [
    "COLORS",
    "QUESTION_TYPES",
    "SHAPES",
    "VQASample",
    "answer_vocabulary",
    "build_prompt",
    "calibration_split",
    "holdout_split",
    "chat_messages",
    "evaluation_subset",
    "image_labels",
    "is_correct",
    "load_image",
    "load_split",
    "normalize_answer",
    "question_type",
    "validate_question",
]
