"""Progress reporting and cancellation shared by every long-running stage.

The core never knows who listens: the app queues each call and shows one Markdown bar per stage
(``StageTracker`` in ``qvlm/ui/jobs.py``), the CLI drives a tqdm bar (``qvlm/cli.py``).
Within a stage the fraction only grows, and it is 1.0 only once the stage's work is finished.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

ProgressCallback = Callable[[str, float, str], None]
"""``(stage, fraction in [0, 1], message)``."""


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Cancelled(RuntimeError):
    """Raised from inside a long loop when the user asked to stop."""


def check_cancel(cancel: CancelToken | threading.Event | None, what: str = "run") -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def report(progress: ProgressCallback | None, stage: str, fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(stage, max(0.0, min(1.0, fraction)), message)


# Stage names a quantization run (and the jobs around it) reports, defined once; the UI maps each
# to a label. Named for the work done in them.
STAGE_CALIBRATION = "calibration"
"""Calibration pairs -> batches, the working copy, the first layers' inputs."""
STAGE_INIT = "init"
"""Layer-wise init: wrap the Linears, quantize weights, set activation ranges (the QLoRA-style baseline)."""
STAGE_VEO = "veo"
"""Visual-encoder optimization (Eqs. 8-10)."""
STAGE_ENTROPY = "entropy"
"""D(k, k+1) per decoder pair (Eqs. 4-5) and the candidate tables."""
STAGE_SEARCH = "search"
"""Eq. 7 partition and the block search (Eq. 3)."""
STAGE_MEASURE = "measure"
"""Measuring every layer's error of the final model, then packing its weights; fraction 1.0 ends the run."""
STAGE_EVAL = "eval"
"""Answering test questions (qvlm.evaluation.accuracy)."""
STAGE_DED = "ded"
"""DED analysis: layer-wise vs joint search per sample (qvlm.evaluation.analysis)."""
STAGE_LOAD = "load"
"""Loading the FP model, the first stage of an app's quantization job."""
STAGE_SCAN = "disagreement scan"
"""Answering test questions with FP and the variants, looking for differences (qvlm.evaluation.compare)."""
STAGE_SWEEP = "bit sweep"
"""Quantizing and evaluating one (recipe, bit-width) point after another (qvlm.evaluation.compare)."""
STAGE_MODALITY = "modality"
"""Forward passes over calibration pairs, recording |x| per modality at each decoder layer's input."""
STAGE_VISION_SITES = "vision sites"
"""One vision-tower pass per site with only that site's activation quantizers on."""


class StepProgress:
    """Progress of a stage made of ``total`` steps of similar cost: 0.0 before the first
    (:meth:`start`), ``done / total`` after each (:meth:`step`), 1.0 exactly after the last."""

    def __init__(self, progress: ProgressCallback | None, stage: str, total: int) -> None:
        self.progress, self.stage, self.total, self.done = progress, stage, max(1, total), 0

    def start(self, message: str = "") -> None:
        report(self.progress, self.stage, 0.0, message)

    def step(self, message: str = "") -> None:
        self.done += 1
        report(self.progress, self.stage, self.done / self.total, message)
