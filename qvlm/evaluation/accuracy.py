"""Accuracy of a model on a task's questions: overall, per question type, and throughput."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from qvlm.data import QUESTION_TYPES, VQASample, is_correct
from qvlm.models.inference import generate_answers
from qvlm.quant.integer import execution_path
from qvlm.utils.progress import STAGE_EVAL, ProgressCallback, check_cancel, report


@dataclass
class EvalResult:
    accuracy: float
    per_type: dict[str, float]
    counts: dict[str, int]
    n: int
    seconds: float
    answers_per_second: float
    predictions: list[dict] = field(default_factory=list, repr=False)
    kernels: str = ""
    """Which path answered: "integer kernels", "simulated", "mixed: ..." or "floating point"
    (:func:`qvlm.quant.integer.execution_path`)."""

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def evaluate(
    model,
    processor,
    samples: list[VQASample],
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    score: Callable[[str, object], float] | None = None,
) -> EvalResult:
    """Greedy-decode every sample and score it: exact match after normalization, or ``score``.

    ``score``: (prediction, sample) -> credit in [0, 1], a task's own rule (:attr:`qvlm.data.Task.score`,
    e.g. VQAv2's partial credit); accuracy is the mean credit.
    """
    if not samples:
        raise ValueError("nothing to evaluate: the sample list is empty")
    start = time.perf_counter()
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    predictions = []
    for at in range(0, len(samples), batch_size):
        check_cancel(cancel, "evaluation")
        chunk = samples[at : at + batch_size]
        answers = generate_answers(model, processor, [s.load_image() for s in chunk], [s.question for s in chunk])
        for s, a in zip(chunk, answers, strict=True):
            ok = is_correct(a, s.answer) if score is None else score(a, s)
            right[s.question_type] += ok
            total[s.question_type] += 1
            predictions.append({"image_id": s.image_id, "question": s.question, "answer": s.answer,
                                "prediction": a, "correct": ok})
        done = min(at + batch_size, len(samples))
        report(progress, STAGE_EVAL, done / len(samples), f"{done}/{len(samples)} questions")
    seconds = time.perf_counter() - start
    n = len(samples)
    types = [t for t in QUESTION_TYPES if total[t]] + [t for t in total if t not in QUESTION_TYPES]
    return EvalResult(
        accuracy=sum(right.values()) / n,
        per_type={t: right[t] / total[t] for t in types},
        counts={t: total[t] for t in types},
        n=n,
        seconds=seconds,
        answers_per_second=n / seconds,
        predictions=predictions,
        kernels=execution_path(model),
    )
