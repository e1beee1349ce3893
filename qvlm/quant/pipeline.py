"""quantize(): run a recipe's stages on a working copy of a model and collect what the app plots.

    qrun = QuantRun(handle, config)          the working copy, its layer map, calibration inputs
    qrun.prepare()                           stage "calibration"
    for stage in configured_stages(config):  "init" (LayerwiseInit), "veo", "entropy" + "search" (CDM)
        stage.run(qrun)
    qrun.measure()                           stage "measure": every layer's error of the final model
    pack_model(qrun.qmodel)                  real low-bit storage (the end of "measure")

Progress arrives as ``progress(stage, fraction_within_stage, message)`` with the stage names of
:mod:`qvlm.utils.progress`; a set ``cancel`` event raises :class:`Cancelled` within a layer pass.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from qvlm.models import VLMHandle
from qvlm.utils.progress import STAGE_MEASURE, Cancelled, ProgressCallback, report
from qvlm.quant.config import QuantConfig
from qvlm.quant.packing import pack_model
from qvlm.quant.partition import singleton_blocks
from qvlm.quant.recipes import Stage, configured_stages
from qvlm.quant.records import BlockSearchRow, LayerError, RunNotes, VeoEpoch, VeoStep
from qvlm.quant.run import QuantRun
from qvlm.quant.vision_ranges import FoldVisionRanges


@dataclass
class QuantResult:
    """A quantized copy of the model and the statistics of how it was made (typed: :mod:`qvlm.quant.records`).

    ``layer_errors``: one :class:`LayerError` per layer, vision tower first, measured on the calibration set
    with the quantized path propagated (each layer gets the quantized model's input) against FP's output.
    """

    handle: VLMHandle
    config: QuantConfig
    entropies: list[float] = field(default_factory=list)
    h0: float | None = None
    blocks: list[list[int]] = field(default_factory=list)
    percentiles: dict[int, float] = field(default_factory=dict)
    layer_errors: list[LayerError] = field(default_factory=list)
    veo_losses: list[VeoStep] = field(default_factory=list)
    veo_holdout: list[VeoEpoch] = field(default_factory=list)
    """Per VEO epoch (0 = the init): Eq. 9's error on held-out train images, and which epoch was kept."""
    timings: dict[str, float] = field(default_factory=dict)
    entropies_per_sample: list[list[float]] = field(default_factory=list)
    search: list[BlockSearchRow] = field(default_factory=list)
    """One row per CDM block (:attr:`QuantRun.search`): choice, accepted, errors, layer passes."""
    init_notes: RunNotes = field(default_factory=RunNotes)
    output_mse: float | None = None
    timing_details: dict[str, float] = field(default_factory=dict)
    """Sub-stage seconds, e.g. "entropy_eq45": the part of "entropy" spent on Eqs. 4-5 (the rest of
    that stage is the quantized pass and the percentile tables, which a layer-wise search needs too)."""

    @classmethod
    def from_run(cls, qrun: QuantRun) -> "QuantResult":
        """The finished run's model and statistics (the run's caches must be released first)."""
        per_sample = qrun.entropies_per_sample
        entropies = [float(v) for v in per_sample.mean(dim=1)] if per_sample is not None and per_sample.numel() else []
        keep = qrun.config.keep_per_sample_stats and per_sample is not None
        rows = [qrun.layer_errors[k] for k in sorted(qrun.layer_errors, key=lambda k: (k[0] != "vision", k[1]))]
        return cls(handle=qrun.quantized_handle(), config=qrun.config, entropies=entropies, h0=qrun.h0,
                   blocks=qrun.blocks, percentiles=qrun.percentiles, layer_errors=rows, veo_losses=qrun.veo_losses,
                   veo_holdout=qrun.veo_holdout,
                   timings=dict(qrun.timings), entropies_per_sample=per_sample.tolist() if keep else [],
                   search=qrun.search, init_notes=qrun.notes, output_mse=qrun.output_mse,
                   timing_details=dict(qrun.timing_details))

    def seconds(self, *stages: str) -> float:
        """Seconds spent in ``stages`` (:attr:`timings`' stages or :attr:`timing_details`' sub-stages); a stage the
        recipe does not run took 0."""
        return sum(self.timings[s] if s in self.timings else self.timing_details.get(s, 0.0) for s in stages)

    def to_dict(self) -> dict:
        """JSON-serialisable statistics (no tensors, no model)."""
        return {
            "model": self.handle.name,
            "config": self.config.to_dict(),
            "recipe": self.config.recipe,
            "bits": self.config.bits_label,
            "entropies": list(self.entropies),
            "h0": self.h0,
            "blocks": [list(b) for b in self.blocks],
            "percentiles": {str(k): v for k, v in self.percentiles.items()},
            "layer_errors": [r.to_dict() for r in self.layer_errors],
            "veo_losses": [r.to_dict() for r in self.veo_losses],
            "veo_holdout": [r.to_dict() for r in self.veo_holdout],
            "timings": dict(self.timings),
            "search": [r.to_dict() for r in self.search],
            "init_notes": self.init_notes.to_dict(),
            "output_mse": self.output_mse,
            "timing_details": dict(self.timing_details),
            "entropies_per_sample": [list(r) for r in self.entropies_per_sample],
        }


def quantize(handle: VLMHandle, config: QuantConfig, progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None, calibration: Sequence | None = None,
             stages: Sequence[Stage] | None = None) -> QuantResult:
    """Quantize a copy of ``handle``'s model by ``config.recipe``; raises :class:`Cancelled` if asked to stop.

    For recipe "fp" nothing is copied: the result's handle is the FP handle itself.
    ``calibration``: image-question-answer samples (anything with ``load_image()``, ``question``
    and ``answer``) to calibrate on instead of ``config.calib_size`` easy-VQA train pairs, e.g.
    the train split of the benchmark a hub model is evaluated on.
    ``stages``: run these configured stages instead of the recipe's (:mod:`qvlm.quant.recipes`); their settings
    replace the config's saved ones, so the result's config records what ran.
    """
    config.validate()
    if stages is None:
        stages = configured_stages(config)
    else:
        stages = tuple(stages)
        config = config.with_stages(stages)
    if not stages:
        report(progress, STAGE_MEASURE, 1.0, "full precision: nothing to quantize")
        blocks = singleton_blocks(len(handle.layer_map.language))
        return QuantResult(handle=handle, config=config, blocks=blocks, timings={"total": 0.0})
    start = time.perf_counter()
    qrun = QuantRun(handle, config, progress, cancel, calibration)
    qrun.prepare()
    if config.vision_fold_ranges:  # the vision ranges are final only after every stage
        stages = (*stages, FoldVisionRanges())
    for stage in stages:
        qrun.check_cancel()
        stage.run(qrun)
    with qrun.timed("measure"):
        qrun.measure()
    qrun.timings["total"] = round(time.perf_counter() - start, 4)
    qrun.release()
    if config.pack_weights:
        pack_model(qrun.qmodel)
    report(progress, STAGE_MEASURE, 1.0, f"{config.recipe} {config.bits_label} in {qrun.timings['total']:.1f} s")
    return QuantResult.from_run(qrun)


__all__ = ["Cancelled", "QuantResult", "QuantRun", "quantize"]
