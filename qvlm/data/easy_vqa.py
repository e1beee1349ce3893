"""The easy-VQA dataset (PyPI package ``easy-vqa``, MIT licence), loaded offline.

easy-VQA ships its 64x64 PNG images and question files inside the wheel, so the whole
main path of the project (training the bundled model, calibration, evaluation) runs with
no network. Every image holds exactly one shape of one colour, which lets us derive a
per-image (shape, colour) label from the questions; the bundled model's vision tower is
pre-trained on those labels (see :mod:`qvlm.training`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from PIL import Image

Split = Literal["train", "test"]
QuestionType = Literal["yes/no", "color", "shape"]
QUESTION_TYPES: tuple[QuestionType, ...] = ("yes/no", "color", "shape")

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


@dataclass(frozen=True)
class VQASample:
    """One image-question-answer triple; ``image_id`` indexes the split's image files."""

    image_id: int
    question: str
    answer: str
    question_type: QuestionType
    split: Split

    @property
    def image_path(self) -> Path:
        return image_paths(self.split)[self.image_id]

    def load_image(self) -> Image.Image:
        return load_image(self.split, self.image_id)


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as err:  # pragma: no cover - declared in requirements.txt
        raise RuntimeError("The easy-VQA dataset needs the 'easy-vqa' package: pip install easy-vqa") from err
    return easy_vqa


def answer_vocabulary() -> list[str]:
    """The 13 possible answers, in a stable (sorted) order."""
    return sorted(_easy_vqa().get_answers())


def question_type(answer: str) -> QuestionType:
    """easy-VQA's question type follows from its answer: yes/no, a colour or a shape."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


@lru_cache(maxsize=2)
def image_paths(split: Split) -> dict[int, Path]:
    ev = _easy_vqa()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return {int(k): Path(v) for k, v in paths.items()}


@lru_cache(maxsize=8192)
def _cached_image(split: Split, image_id: int) -> Image.Image:
    with Image.open(image_paths(split)[image_id]) as img:
        return img.convert("RGB")


def load_image(split: Split, image_id: int) -> Image.Image:
    """The RGB image; cached because every image is asked about ~10 times."""
    return _cached_image(split, image_id).copy()


@lru_cache(maxsize=2)
def load_split(split: Split) -> tuple[VQASample, ...]:
    """All questions of a split, in the package's order (deterministic)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ev = _easy_vqa()
    texts, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    return tuple(
        VQASample(int(i), q, a, question_type(a), split) for q, a, i in zip(texts, answers, ids, strict=True)
    )


def calibration_split(n: int = 64, seed: int = 0) -> list[VQASample]:
    """A deterministic random subset of the *train* split (never test), as the paper's 64 pairs.

    Sampling is stratified by nothing on purpose: the paper draws calibration pairs at random.
    """
    samples = load_split("train")
    if not 1 <= n <= len(samples):
        raise ValueError(f"calibration size must be between 1 and {len(samples)}, got {n}")
    rng = random.Random(seed)
    return [samples[i] for i in sorted(rng.sample(range(len(samples)), n))]


def holdout_split(n: int, exclude_image_ids: set[int], seed: int = 0) -> list[VQASample]:
    """``n`` train pairs on images outside ``exclude_image_ids``, one question per image.

    Why: to tell whether a step that learns on the calibration images (VEO) also lowers the error
    on images it has not seen, without touching the test split that the accuracy is read from.
    """
    by_image: dict[int, list[VQASample]] = {}
    for s in load_split("train"):
        if s.image_id not in exclude_image_ids:
            by_image.setdefault(s.image_id, []).append(s)
    if not 0 <= n <= len(by_image):
        raise ValueError(f"held-out size must be between 0 and {len(by_image)} images, got {n}")
    rng = random.Random(seed)
    return [rng.choice(by_image[i]) for i in sorted(rng.sample(sorted(by_image), n))]


def evaluation_subset(limit: int | None = None, seed: int = 0) -> list[VQASample]:
    """The test split, or a fixed random subset of ``limit`` questions (same for every model)."""
    return fixed_subset(list(load_split("test")), limit, seed)


def fixed_subset(samples: list, limit: int | None, seed: int = 0) -> list:
    """All ``samples``, or ``limit`` of them drawn at random by ``seed``, in their original order.

    Why one helper: every model and every task reads its accuracy from the same questions.
    """
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    rng = random.Random(seed)
    return [samples[i] for i in sorted(rng.sample(range(len(samples)), limit))]


_SHAPE_IN_Q = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_COLOR_IN_Q = re.compile(r"\b(" + "|".join(COLORS) + r")\b")


def image_labels(split: Split) -> dict[int, tuple[int, int]]:
    """Per-image (shape index, colour index) implied by the questions; -1 where unknown.

    A "what shape/colour" answer gives the label directly; "what is the red shape?" and
    "what colour is the circle?" give the other attribute too; a yes/no question about
    an attribute gives it when the answer is positive (negated questions flip the answer).
    """
    shape: dict[int, int] = {}
    color: dict[int, int] = {}
    for s in load_split(split):
        q = s.question
        shape_word = _SHAPE_IN_Q.search(q)
        color_word = _COLOR_IN_Q.search(q)
        if s.question_type == "shape":
            shape[s.image_id] = SHAPES.index(s.answer)
            if color_word:
                color[s.image_id] = COLORS.index(color_word.group(1))
        elif s.question_type == "color":
            color[s.image_id] = COLORS.index(s.answer)
            if shape_word:
                shape[s.image_id] = SHAPES.index(shape_word.group(1))
        else:
            negated = " not " in f" {q} " or q.startswith("is no ")
            present = (s.answer == "yes") != negated
            if present and shape_word:
                shape[s.image_id] = SHAPES.index(shape_word.group(1))
            if present and color_word:
                color[s.image_id] = COLORS.index(color_word.group(1))
    return {i: (shape.get(i, -1), color.get(i, -1)) for i in image_paths(split)}
