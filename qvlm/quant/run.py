"""QuantRun: the state one quantization run shares between its stages.

A run owns a *working copy* of the FP model (sharing its weight storage until a layer is
quantized, :mod:`qvlm.quant.working_copy`), that copy's layer map, and the cached inputs of the
first vision and decoder layers for the calibration set. Each stage of a recipe
(:class:`~qvlm.quant.layerwise.LayerwiseInit`, :class:`~qvlm.quant.veo.VisualEncoderOptimization`,
:class:`~qvlm.quant.cdm.CrossLayerDependencyMining`) works on it in turn and leaves what it measured here;
:func:`qvlm.quant.pipeline.quantize` turns the finished run into a :class:`QuantResult`.

The FP model is only ever *read* (its layers are called for reference outputs), never hooked
or changed, so the app can keep answering with it while a quantization runs.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from qvlm.data import get_task
from qvlm.models import VLMHandle, build_layer_map
from qvlm.utils.progress import STAGE_CALIBRATION, STAGE_MEASURE, ProgressCallback, StepProgress, check_cancel, report
from qvlm.quant.calibration import (
    CalibBatch,
    LayerInputs,
    build_batches,
    calibration_batches,
    capture_layer_inputs,
    per_sample_mse,
    per_sample_power,
    run_layer,
)
from qvlm.quant.config import QuantConfig
from qvlm.quant.partition import singleton_blocks
from qvlm.quant.records import BlockSearchRow, LayerError, RunNotes, VeoEpoch, VeoStep
from qvlm.quant.working_copy import working_copy

Grid = tuple[torch.Tensor, torch.Tensor]
"""(step, zero point) of a uniform grid, per channel."""


class QuantRun:
    """One quantization of ``fp`` by ``config``: the working copy, its layer map, cached inputs.

    Build it, call :meth:`prepare`, then let stages work on it. Everything a stage measures for
    the result (layer errors, VEO losses, CDM's entropies and blocks, timings) is kept here.
    """

    def __init__(self, fp: VLMHandle, config: QuantConfig, progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, calibration: Sequence | None = None) -> None:
        self.fp = fp
        self.config = config
        self.progress = progress
        self.cancel = cancel
        self.calibration = calibration
        self.generator = torch.Generator().manual_seed(config.seed)
        self.timings: dict[str, float] = {}
        self.timing_details: dict[str, float] = {}
        """Sub-stage seconds, not added to the stage totals (e.g. "entropy_eq45")."""
        self.notes = RunNotes()
        """Per-group choices of the init (clip factor, AWQ alpha), keyed "tower.layer.group.what"."""
        self.layer_errors: dict[tuple[str, int], LayerError] = {}
        self.seen_size = config.calib_size
        """Train pairs (the first of the calibration draw) the stages so far learned from; a stage that learns from
        more raises it (VEO's ``calib_size``), so every held-out draw after it excludes their images."""
        # Set by prepare():
        self.batches: list[CalibBatch] = []
        self.qmodel: torch.nn.Module | None = None
        self.qmap = None
        """The working copy's layer map; :meth:`refresh_layer_map` after replacing modules."""
        self.vision_inputs: LayerInputs | None = None
        self.language_inputs: LayerInputs | None = None
        # Set by the stages:
        self.residual_grids: list[Grid] = []
        """Per decoder layer, the min/max grid of its quantized-path input (the "residual" entropy site)."""
        self.veo_losses: list[VeoStep] = []
        self.veo_holdout: list[VeoEpoch] = []
        """Eq. 9's error on held-out images per VEO epoch (0: before VEO), "kept" on the epoch kept."""
        self.entropies_per_sample: torch.Tensor | None = None
        self.h0: float | None = None
        self.blocks: list[list[int]] = singleton_blocks(len(fp.layer_map.language))
        self.percentiles: dict[int, float] = {}
        self.search: list[BlockSearchRow] = []
        """One row per CDM block: its choice, whether it was accepted, its errors and layer passes."""
        self.output_mse: float | None = None
        self._holdout: dict[tuple[int, int], list[CalibBatch]] = {}

    # --- plumbing the stages share ----------------------------------------------------------
    def refresh_layer_map(self) -> None:
        self.qmap = build_layer_map(self.qmodel)

    def check_cancel(self) -> None:
        check_cancel(self.cancel, "quantization")

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        report(self.progress, stage, fraction, message)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall time to ``timings[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 4)

    # --- the calibration stage -----------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> None:
        """Calibration batches, the working copy, and the inputs of the first layer of each tower."""
        cfg = self.config
        with self.timed(STAGE_CALIBRATION):
            self.report(STAGE_CALIBRATION, 0.0, f"{cfg.calib_size} calibration pairs")
            if self.calibration is not None:
                self.batches = build_batches(self.fp.processor, list(self.calibration), cfg.calib_batch,
                                             self.fp.device, self.fp.dtype)
            else:
                self.batches = calibration_batches(self.fp, cfg.calib_size, cfg.calib_seed, cfg.calib_batch)
            self.check_cancel()
            self.report(STAGE_CALIBRATION, 0.4, "copying the model")
            self.qmodel = working_copy(self.fp.model)
            self.qmodel.requires_grad_(False)
            self.qmodel.eval()
            self.refresh_layer_map()
            self.report(STAGE_CALIBRATION, 0.6, "capturing first-layer inputs")
            self.vision_inputs, self.language_inputs = capture_layer_inputs(
                self.qmodel, [self.qmap.vision[0].module, self.qmap.language[0].module], self.batches,
                [False, True], self.cancel)
            self.report(STAGE_CALIBRATION, 1.0, "done")

    def holdout_batches(self, n: int, seen_size: int | None = None) -> list[CalibBatch]:
        """``n`` train pairs on images no calibration pair of this run uses (drawn with seed
        ``calib_seed + 1``): where VEO's early stopping and CDM's acceptance check see unseen images.

        ``seen_size`` is how many calibration pairs to exclude (default :attr:`seen_size`). Empty when
        ``n`` is 0 or the run was given its own calibration pairs (no task split to draw from).
        """
        cfg = self.config
        if not n or self.calibration is not None:
            return []
        key = (n, seen_size or self.seen_size)
        if key not in self._holdout:
            task = get_task(self.fp.task)
            seen = {s.image_id for s in task.calibration_split(key[1], cfg.calib_seed)}
            samples = task.holdout_split(n, seen, cfg.calib_seed + 1)
            self._holdout[key] = build_batches(self.fp.processor, samples, cfg.calib_batch, self.fp.device,
                                               self.fp.dtype)
        return self._holdout[key]

    def language_input(self) -> list[torch.Tensor]:
        """Quantized-path input of decoder layer 0 (after the current quantized vision tower/projector)."""
        (cap,) = capture_layer_inputs(self.qmodel, [self.qmap.language[0].module], self.batches, [True], self.cancel)
        return cap.hidden

    def entropy_grids(self) -> list[Grid]:
        """Per decoder layer, the grid Eq. 4 assigns the entropy-site activations to.

        "attn_input": the layer's calibrated q_proj input quantizer (what the layer really
        quantizes); otherwise, or before calibration, the residual stream's min/max grid.
        """
        grids = []
        for i, entry in enumerate(self.qmap.language):
            act = getattr(entry.linears.get("q"), "act", None)
            if self.config.entropy_site == "attn_input" and act is not None and act.calibrated:
                grids.append(act.grid())
            else:
                grids.append(self.residual_grids[i])
        return grids

    # --- errors --------------------------------------------------------------------------------
    def record_error(self, tower: str, i: int, ys: list[torch.Tensor], yr: list[torch.Tensor],
                     inputs: LayerInputs, key: str) -> None:
        """Store the calibration-set MSE of one layer's output against FP under ``key``."""
        err = torch.cat([per_sample_mse(y, r, m) for y, r, m in zip(ys, yr, inputs.masks)]).mean().item()
        row = self.layer_errors.get((tower, i))
        if row is None:
            fp_mse = torch.cat([per_sample_power(r, m) for r, m in zip(yr, inputs.masks)]).mean().item()
            row = LayerError(tower, i, fp_mse)
        self.layer_errors[(tower, i)] = replace(row, **{key: err})

    @torch.no_grad()
    def measure(self) -> None:
        """quant_mse of every layer of the final model, and the error of the LLM's last hidden state.

        Each quantized layer gets the quantized path's input, each FP layer the FP input, so a
        layer's error includes what it inherits (the propagation of Eq. 1). Progress: one step per
        layer, the last step left to :func:`~qvlm.quant.pipeline.quantize` (packing, then 1.0).
        """
        steps = StepProgress(self.progress, STAGE_MEASURE, len(self.qmap.vision) + len(self.qmap.language) + 1)
        steps.start("measuring layer errors")
        fp_map = self.fp.layer_map
        for tower, entries, inputs, xs in (
            ("vision", self.qmap.vision, self.vision_inputs, self.vision_inputs.hidden),
            ("language", self.qmap.language, self.language_inputs, self.language_input()),
        ):
            xr = inputs.hidden
            fp_entries = fp_map.vision if tower == "vision" else fp_map.language
            for i, entry in enumerate(entries):
                self.check_cancel()
                yr = run_layer(fp_entries[i].module, inputs, xr, self.cancel)
                ys = run_layer(entry.module, inputs, xs, self.cancel)
                self.record_error(tower, i, ys, yr, inputs, "quant_mse")
                xs, xr = ys, yr
                steps.step(f"{tower} layer {i + 1}/{len(entries)}")
        norm, fp_norm = self.qmap.final_norm, self.fp.layer_map.final_norm
        errs = [per_sample_mse(norm(y), fp_norm(r), m) for y, r, m in zip(xs, xr, self.language_inputs.masks)]
        self.output_mse = float(torch.cat(errs).mean())

    def release(self) -> None:
        """Drop the cached calibration inputs (the working copy stays: it is the result)."""
        self.batches = []
        self.vision_inputs = self.language_inputs = None
        self.residual_grids = []

    def quantized_handle(self) -> VLMHandle:
        cfg = self.config
        return VLMHandle(model=self.qmodel, processor=self.fp.processor, layer_map=build_layer_map(self.qmodel),
                         name=f"{self.fp.name} [{cfg.recipe} {cfg.bits_label}]", source=self.fp.source,
                         task=self.fp.task, task_recorded=self.fp.task_recorded,
                         checkpoint_dtype=self.fp.checkpoint_dtype)
