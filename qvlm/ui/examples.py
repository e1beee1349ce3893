"""Test-split images the Ask tab serves: each task's examples, and the images the disagreement finder found.

A served image's file name says which test image it is: ``easyvqa_test_12.png`` (an easy-VQA image id,
as the bundled examples in ``assets/examples`` are named) or ``mosaic_test_12-40-7-3.png`` (a mosaic's
four cell ids, row-major). So a question about it gets its task's reference answer
(:func:`reference_answer`) whether the image came from an example, from the finder, or was saved and
uploaded again.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from qvlm.data import TASKS, get_task
from qvlm.data.mosaic import mosaic_example_questions
from qvlm.ui.settings import EXAMPLES_DIR

ImageId = int | tuple[int, ...]
"""An easy-VQA image id, or a mosaic's cell ids."""

TEST_IMAGE_DIR = Path(tempfile.gettempdir()) / "qvlm-test-images"
"""Where served copies are written: Gradio serves files from the temp folder (not from site-packages)."""
MOSAIC_EXAMPLES = 6
MOSAIC_EXAMPLE_SEED = 23
"""The fixed mosaic examples: with this seed the six test questions come from six templates and cover all
five question types (count, position, compare, exists, negation)."""

_PREFIXES = {name.replace("-", ""): name for name in TASKS}  # "easyvqa" -> "easy-vqa"
_FILE_NAME = re.compile(rf"(?<![a-z])({'|'.join(_PREFIXES)})_(train|test)_(\d+(?:-\d+)*)\.png$")


def image_file_name(task: str, split: str, image_id: ImageId) -> str:
    """``<task>_<split>_<ids>.png``, the task without its hyphen and a mosaic's cell ids joined by ``-``."""
    ids = "-".join(str(i) for i in image_id) if isinstance(image_id, tuple) else str(image_id)
    return f"{task.replace('-', '')}_{split}_{ids}.png"


def parse_image_file_name(path: str | os.PathLike) -> tuple[str, str, ImageId] | None:
    """(task, split, image id) from a file named by :func:`image_file_name`; None for any other file."""
    m = _FILE_NAME.search(Path(path).name)
    if m is None:
        return None
    ids = tuple(int(i) for i in m.group(3).split("-"))
    return _PREFIXES[m.group(1)], m.group(2), ids[0] if len(ids) == 1 else ids


def served_image_path(task: str, sample: Any) -> str:
    """A served copy of a sample's image (a ``VQASample`` or ``MosaicSample``), written on first use.

    Written to a temporary name and renamed, so a second session asking for the same image at the same
    time never reads a half-written file.
    """
    TEST_IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    path = TEST_IMAGE_DIR / image_file_name(task, sample.split, sample.image_id)
    if not path.exists():
        partial = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.png")
        sample.load_image().save(partial)
        partial.replace(path)
    return str(path)


def _normalize_question(q: str) -> str:
    return " ".join(q.lower().replace("?", " ").split())


@lru_cache(maxsize=len(TASKS))
def _test_answers(task: str) -> dict[tuple[ImageId, str], str]:
    """(image id, normalized question) -> answer, over the task's whole test split."""
    return {(s.image_id, _normalize_question(s.question)): s.answer for s in get_task(task).evaluation_subset()}


def reference_answer(path: str | os.PathLike | None, question: str) -> tuple[str, str] | None:
    """(task, the test split's answer) when the image is a named test image and the question is one of its
    test questions; None otherwise (an upload, another question)."""
    named = parse_image_file_name(path) if path else None
    if named is None or named[1] != "test":
        return None
    task, _, image_id = named
    answer = _test_answers(task).get((image_id, _normalize_question(question)))
    return (task, answer) if answer is not None else None


@dataclass(frozen=True)
class TaskExamples:
    """What the Ask tab offers for one task: example questions, and example images each with a question."""

    questions: list[str]
    images: list[tuple[str, str]]  # (image path, question)
    label: str  # the image examples' title


def easy_vqa_examples(meta: dict[str, Any]) -> TaskExamples:
    """The bundled easy-VQA examples (``assets/examples/examples.json``, as :func:`qvlm.ui.state.load_examples`
    reads it), each image with its first question."""
    return TaskExamples(
        questions=list(meta.get("generic_questions", [])),
        images=[(str(EXAMPLES_DIR / img["file"]), img["questions"][0]["question"]) for img in meta.get("images", [])],
        label="Example images (easy-VQA test split): click one",
    )


def mosaic_examples() -> TaskExamples:
    """Six fixed test mosaics with their test questions, written once to :data:`TEST_IMAGE_DIR`, and one
    example question per question type."""
    samples = get_task("mosaic").evaluation_subset(MOSAIC_EXAMPLES, seed=MOSAIC_EXAMPLE_SEED)
    return TaskExamples(
        questions=mosaic_example_questions(),
        images=[(served_image_path("mosaic", s), s.question) for s in samples],
        label="Example mosaics (mosaic test split, four easy-VQA test images each): click one",
    )


def examples_by_task(meta: dict[str, Any]) -> dict[str, TaskExamples]:
    """Every task's examples, easy-VQA's from ``meta`` (the bundled examples), by task name."""
    return {"easy-vqa": easy_vqa_examples(meta), "mosaic": mosaic_examples()}
