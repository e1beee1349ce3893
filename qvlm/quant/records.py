"""What a quantization run records, as typed values: per-layer errors, VEO's history, CDM's block rows, notes.

Why typed: these rows travel from the stages to the CLI, the benchmarks, the plots and the prose, and as
dicts every reader had to know their keys and guess their defaults (``row.get("quant_mse", 0.0)``); a
misspelt key read a default and showed a wrong figure without an error. Each record is frozen (a stage
that learns more makes a new one with :func:`dataclasses.replace`) and writes the saved JSON form with
``to_dict()``: the keys are those the run files have always held, so stored results stay comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qvlm.utils.records import JsonRecord


def _present(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without the values not measured (None): the saved form never held keys for them."""
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class LayerError:
    """One layer's output error against FP on the calibration set, with the quantized path propagated.

    ``fp_mse``: mean square of the FP layer's output (the signal power, to normalise by); ``init_mse``: the
    error after the layer-wise init; ``quant_mse``: after the whole recipe (None until measured).
    """

    tower: str
    index: int
    fp_mse: float
    init_mse: float | None = None
    quant_mse: float | None = None

    @property
    def rel_err(self) -> float | None:
        """quant_mse / fp_mse: comparable across layers whose outputs differ in scale."""
        return None if self.quant_mse is None else self.quant_mse / max(self.fp_mse, 1e-30)

    def to_dict(self) -> dict[str, Any]:
        return _present(asdict(self) | {"rel_err": self.rel_err})


@dataclass(frozen=True)
class VeoStep(JsonRecord):
    """VEO's loss terms after one optimiser step (Eq. 9: total = reg + lambda-weighted entropy and error)."""

    step: int
    epoch: int
    total: float
    reg: float
    ent: float
    err: float


@dataclass(frozen=True)
class HeldOutError(JsonRecord):
    """Eq. 9's error on held-out pairs, and where it ends: the answers (:func:`qvlm.quant.veo.holdout_error`).

    ``err`` = ``visual`` + eta * ``output``; ``answer_agree``: the share of teacher-forced answer tokens whose
    most likely token is FP's; ``answer_kl``: mean KL(FP || quantized) in nats over ``answer_tokens`` positions.
    """

    visual: float
    output: float
    err: float
    answer_agree: float
    answer_kl: float
    answer_tokens: int


@dataclass(frozen=True)
class VeoEpoch:
    """The held-out error before VEO (epoch 0: the layer-wise init) or after one of its epochs.

    ``kept``: whether the model keeps this epoch's bounds; ``vision_acts_fp`` (epoch 0 only): the same pairs
    with the vision activations unquantized, the best any vision range could do.
    """

    epoch: int
    held_out: HeldOutError
    kept: bool = False
    vision_acts_fp: HeldOutError | None = None

    @property
    def err(self) -> float:
        return self.held_out.err

    @property
    def answer_kl(self) -> float:
        return self.held_out.answer_kl

    def to_dict(self) -> dict[str, Any]:
        return _present({"epoch": self.epoch, **self.held_out.to_dict(), "kept": self.kept,
                         "vision_acts_fp": self.vision_acts_fp.to_dict() if self.vision_acts_fp else None})


@dataclass(frozen=True)
class BlockSearchRow(JsonRecord):
    """One CDM block: the joint choice (percentile labels), whether it was kept, and what it cost.

    ``greedy``: the layer-by-layer choice over the same grid; ``error`` / ``greedy_error`` /
    ``incumbent_error``: the block objective of the joint choice, the greedy one and the init's ranges
    (None where the search never scored them); ``accept_errors``: per output check (calibration,
    "holdout"), [error with the choice, error with the init's ranges]; empty when no check ran.
    """

    block: list[int]
    choice: list[float]
    accepted: bool
    greedy: list[float]
    error: float
    greedy_error: float
    incumbent_error: float | None
    objective: str
    layer_passes: int
    accept_errors: dict[str, list[float]] = field(default_factory=dict)

    @property
    def checked(self) -> bool:
        """Whether an output check decided this block (it changed the ranges and a check ran)."""
        return bool(self.accept_errors)

    @property
    def refused_on_unseen(self) -> bool:
        return self.checked and not self.accepted and "holdout" in self.accept_errors


@dataclass
class RunNotes:
    """What the stages noted about how they ran: skips and why, the fold of the vision ranges, per-group facts.

    Mutable while the run goes (each stage adds its own), then handed to the result. ``init``: per layer
    group, the layer-wise init's numbers (e.g. ``"vision.0.q/k/v.clip"``: the chosen clip factor,
    ``".awq_alpha"``: AWQ's scale exponent).
    """

    veo_skipped: str | None = None
    cdm_skipped: str | None = None
    cdm_holdout: str | None = None
    vision_fold: dict[str, Any] | None = None
    init: dict[str, float] = field(default_factory=dict)

    _KEYS = {"veo_skipped": "veo.skipped", "cdm_skipped": "cdm.skipped", "cdm_holdout": "cdm.holdout",
             "vision_fold": "vision.fold"}

    def to_dict(self) -> dict[str, Any]:
        """The saved form: dotted names, as the run files have always held them."""
        named = {key: getattr(self, attr) for attr, key in self._KEYS.items()}
        return dict(self.init) | _present(named)
