"""The paper's hub benchmarks (Table 3) as tasks: ScienceQA-IMG and VQAv2, loaded with ``datasets``.

Nothing is downloaded at import: each split is fetched from the Hugging Face hub the first time a
task function is called, and a missing ``datasets`` package or an unreachable hub is a ValueError
that says so. :mod:`qvlm.data.tasks` registers them as ``scienceqa-img`` and ``vqav2`` (kept out of
:data:`qvlm.data.TASKS`, whose tasks are bundled and read offline).

* ScienceQA-IMG (``derek-thomas/ScienceQA``, questions with an image): prompt as LLaVA-1.5's
  SQA-IMG evaluation ("Answer with the option's letter from the given choices directly."), scored
  by the first option letter of the answer.
* VQAv2 (``lmms-lab/VQAv2``): "Answer the question using a single word or phrase.", scored with the
  VQA accuracy min(#humans that gave the answer / 3, 1) on normalised strings.

Calibration and held-out pairs come from the *train* split, never the evaluated one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

SCIENCEQA = "scienceqa-img"
VQAV2 = "vqav2"
LETTERS = "ABCDEFGHIJ"
SCIENCEQA_SUBJECTS = ("natural science", "social science", "language science")
VQAV2_ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass(frozen=True)
class HubSample:
    """One hub question, shaped like :class:`qvlm.data.VQASample` (image, question, answer, type)."""

    image: Any
    question: str
    answer: str
    image_id: str
    split: str
    references: tuple[str, ...] = ()
    """VQAv2: the ten human answers the VQA accuracy counts."""
    question_type: str = "all"

    def load_image(self):
        return self.image.convert("RGB")


def load_hub_split(hub_id: str, split: str):
    """One split of a hub dataset; ValueError when ``datasets`` is missing or the hub cannot serve it."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ValueError(f"the {hub_id} task needs the `datasets` package: pip install datasets") from err
    try:
        return load_dataset(hub_id, split=split)
    except Exception as err:  # noqa: BLE001 - network, authentication or a missing split: the user's setup
        raise ValueError(f"could not load {hub_id} ({split}) from the Hugging Face hub: {err}") from err


def _draw(n_rows: int, limit: int | None, seed: int) -> list[int]:
    """Row indices: all of them, or ``limit`` drawn at random by ``seed``, in their original order."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    if limit < 1:
        raise ValueError(f"the number of questions must be at least 1, got {limit}")
    return sorted(random.Random(seed).sample(range(n_rows), limit))


# ---------------------------------------------------------------------------- ScienceQA-IMG
def _scienceqa(split: str, limit: int | None, seed: int, exclude: set | frozenset = frozenset()) -> list[HubSample]:
    ds = load_hub_split("derek-thomas/ScienceQA", split)
    with_image = [i for i, image in enumerate(ds["image"]) if image is not None and f"{split}-{i}" not in exclude]
    out = []
    for i in (with_image[j] for j in _draw(len(with_image), limit, seed)):
        r = ds[i]
        options = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(r["choices"]))
        hint = f"Context: {r['hint']}\n" if r.get("hint") else ""
        question = f"{hint}{r['question']}\n{options}\nAnswer with the option's letter from the given choices directly."
        out.append(HubSample(r["image"], question, LETTERS[r["answer"]], f"{split}-{i}", split,
                             question_type=r.get("subject") or "all"))
    return out


def scienceqa_evaluation_subset(limit: int | None = None, seed: int = 0) -> list[HubSample]:
    return _scienceqa("test", limit, seed)


def scienceqa_calibration_split(n: int = 64, seed: int = 0) -> list[HubSample]:
    return _scienceqa("train", n, seed)


def scienceqa_holdout_split(n: int, exclude_image_ids: set, seed: int = 0) -> list[HubSample]:
    return _scienceqa("train", n, seed + 1, set(exclude_image_ids))


def scienceqa_answers() -> list[str]:
    return list(LETTERS)


def score_scienceqa(prediction: str, sample: HubSample) -> float:
    """1.0 when the first standalone option letter of ``prediction`` is the right one."""
    m = re.search(r"\b([A-J])\b", prediction.strip())
    return float(bool(m) and m.group(1) == sample.answer)


# ---------------------------------------------------------------------------- VQAv2
def _vqav2(split: str, limit: int | None, seed: int, exclude: set | frozenset = frozenset()) -> list[HubSample]:
    ds = load_hub_split("lmms-lab/VQAv2", split)
    rows = [i for i, image_id in enumerate(ds["image_id"]) if image_id not in exclude]
    out = []
    for i in (rows[j] for j in _draw(len(rows), limit, seed)):
        r = ds[i]
        question = f"{r['question']}\nAnswer the question using a single word or phrase."
        out.append(HubSample(r["image"], question, r["multiple_choice_answer"], r["image_id"], split,
                             tuple(a["answer"] for a in r["answers"]), r.get("answer_type") or "all"))
    return out


def vqav2_evaluation_subset(limit: int | None = None, seed: int = 0) -> list[HubSample]:
    return _vqav2("validation", limit, seed)


def vqav2_calibration_split(n: int = 64, seed: int = 0) -> list[HubSample]:
    return _vqav2("train", n, seed)


def vqav2_holdout_split(n: int, exclude_image_ids: set, seed: int = 0) -> list[HubSample]:
    return _vqav2("train", n, seed + 1, set(exclude_image_ids))


def vqav2_answers() -> list[str]:
    raise ValueError("VQAv2 answers are open-ended: the task has no fixed answer set")


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def score_vqav2(prediction: str, sample: HubSample) -> float:
    """VQA accuracy: min(#human answers equal to ``prediction`` / 3, 1), on normalised strings."""
    pred = _normalise(prediction)
    return min(1.0, sum(_normalise(r) == pred for r in sample.references) / 3.0)
