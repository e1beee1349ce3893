"""quantize(): run a recipe on a deep copy of a model and collect everything the app plots.

Stages (each reported through ``progress(stage, fraction_within_stage, message)``):

* ``calibration``  calibration pairs -> batches; deep copy; capture the first-layer inputs (FP)
* ``init``         wrap Linears, quantize weights, layer-wise activation ranges, tower by tower,
                   layer by layer on the quantized path (:mod:`qvlm.quant.layerwise`)
* ``veo``          visual-encoder optimization (:mod:`qvlm.quant.veo`)
* ``entropy``      D(k, k+1) and percentile tables (:mod:`qvlm.quant.cdm`)
* ``search``       Eq. 7 partition + joint block search (:mod:`qvlm.quant.cdm`)
* ``done``

The FP model is only ever *read* (its layers are called for reference outputs), never hooked
or changed, so the app can keep answering with it while a quantization runs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from qvlm.models import VLMHandle, build_layer_map
from qvlm.progress import Cancelled, ProgressCallback, check_cancel, report
from qvlm.quant.calibration import (
    build_batches,
    LayerInputs,
    calibration_batches,
    capture_layer_inputs,
    observing,
    per_sample_mse,
    per_sample_power,
    release_records,
    run_layer,
)
from qvlm.quant.cdm import EntropySpec, entropy_pass, residual_grid, search_blocks
from qvlm.quant.config import QuantConfig
from qvlm.quant.layerwise import ActInitSpec, WeightSpec, init_layer
from qvlm.quant.recipes import get_recipe
from qvlm.quant.packing import pack_model
from qvlm.quant.partition import partition_layers, singleton_blocks
from qvlm.quant.qlinear import QuantLinear, replace_module
from qvlm.quant.quantizers import ActQuantizer, lp_clip_search, minmax_ranges, quantize_weight_uniform
from qvlm.quant.veo import VEOSpec, run_veo
from qvlm.quant.working_copy import working_copy


@dataclass
class QuantResult:
    """A quantized copy of the model and the statistics of how it was made.

    ``layer_errors`` rows: {"tower", "index", "fp_mse" (mean square of the FP layer output: the
    signal power, to normalise by), "init_mse" (output MSE vs FP after the layer-wise init),
    "quant_mse" (after the whole recipe), "rel_err" (quant_mse / fp_mse)}; the MSEs are measured on
    the calibration set with the quantized path propagated (each layer gets the quantized
    model's input) against the FP model's output.
    """

    handle: VLMHandle
    config: QuantConfig
    entropies: list[float] = field(default_factory=list)
    h0: float | None = None
    blocks: list[list[int]] = field(default_factory=list)
    percentiles: dict[int, float] = field(default_factory=dict)
    layer_errors: list[dict] = field(default_factory=list)
    veo_losses: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    entropies_per_sample: list[list[float]] = field(default_factory=list)
    search: list[dict] = field(default_factory=list)
    init_notes: dict[str, Any] = field(default_factory=dict)
    output_mse: float | None = None
    timing_details: dict[str, float] = field(default_factory=dict)
    """Sub-stage seconds, e.g. "entropy_eq45": the part of "entropy" spent on Eqs. 4-5 (the rest of
    that stage is the quantized pass and the percentile tables, which a layer-wise search needs too)."""

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
            "layer_errors": list(self.layer_errors),
            "veo_losses": list(self.veo_losses),
            "timings": dict(self.timings),
            "search": list(self.search),
            "init_notes": dict(self.init_notes),
            "output_mse": self.output_mse,
            "timing_details": dict(self.timing_details),
            "entropies_per_sample": [list(r) for r in self.entropies_per_sample],
        }


def quantize(handle: VLMHandle, config: QuantConfig, progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None, calibration: Sequence | None = None) -> QuantResult:
    """Quantize a copy of ``handle``'s model by ``config.recipe``; raises :class:`Cancelled` if asked to stop.

    For recipe "fp" nothing is copied: the result's handle is the FP handle itself.
    ``calibration``: image-question-answer samples (anything with ``load_image()``, ``question``
    and ``answer``) to calibrate on instead of ``config.calib_size`` easy-VQA train pairs, e.g.
    the train split of the benchmark a hub model is evaluated on.
    """
    config.validate()
    recipe = get_recipe(config.recipe)
    if not recipe.quantize:
        report(progress, "done", 1.0, "full precision: nothing to quantize")
        blocks = singleton_blocks(len(handle.layer_map.language))
        return QuantResult(handle=handle, config=config, blocks=blocks, timings={"total": 0.0})
    return _Run(handle, config, progress, cancel, calibration).run()


class _Run:
    def __init__(self, handle: VLMHandle, cfg: QuantConfig, progress, cancel, calibration=None) -> None:
        self.fp = handle
        self.calibration = calibration
        self.cfg = cfg
        self.recipe = get_recipe(cfg.recipe)
        self.progress = progress
        self.cancel = cancel
        self.timings: dict[str, float] = {}
        self.timing_details: dict[str, float] = {}  # sub-stage times (not added to the stage totals)
        self.errors: dict[tuple[str, int], dict] = {}
        self.notes: dict[str, Any] = {}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.weights = WeightSpec(cfg.w_bits, cfg.resolved_weight_format(), cfg.resolved_weight_group())
        self.act_init = ActInitSpec(self.recipe.act_init, tuple(cfg.init_clip_grid), cfg.init_lp_norm)

    # ------------------------------------------------------------------------------------------
    def _tick(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - start, 4)
        return now

    def _check(self) -> None:
        check_cancel(self.cancel, "quantization")

    def prepare(self) -> None:
        """Calibration batches, the model copy, first-layer captures, wrapping and layer-wise init."""
        t = time.perf_counter()
        cfg = self.cfg
        with torch.no_grad():
            report(self.progress, "calibration", 0.0, f"{cfg.calib_size} calibration pairs")
            if self.calibration is not None:
                self.batches = build_batches(self.fp.processor, list(self.calibration), cfg.calib_batch,
                                             self.fp.device, self.fp.dtype)
            else:
                self.batches = calibration_batches(self.fp, cfg.calib_size, cfg.calib_seed, cfg.calib_batch)
            self._check()
            report(self.progress, "calibration", 0.4, "copying the model")
            self.qmodel = working_copy(self.fp.model)
            self.qmodel.requires_grad_(False)
            self.qmodel.eval()
            qmap = build_layer_map(self.qmodel)
            report(self.progress, "calibration", 0.6, "capturing first-layer inputs")
            vis_in, lang_in = capture_layer_inputs(
                self.qmodel, [qmap.vision[0].module, qmap.language[0].module], self.batches, [False, True], self.cancel)
            self.vis_in, self.lang_in = vis_in, lang_in
            report(self.progress, "calibration", 1.0, "done")
            t = self._tick("calibration", t)

            self._wrap()
            self._init_towers()
            self._tick("init", t)

    def run(self) -> QuantResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        self.prepare()
        t = time.perf_counter()
        veo_log: list[dict] = []
        if self.recipe.veo and cfg.quantize_vision:
            spec = VEOSpec(cfg.veo_epochs, cfg.veo_lr, cfg.veo_lambda1, cfg.veo_lambda2, cfg.veo_eta, cfg.veo_params,
                           cfg.veo_visual_output, cfg.veo_jacobian_every, cfg.a_bits, cfg.soft_temperature,
                           cfg.soft_delta_mode, cfg.entropy_site, cfg.veo_micro_batch, cfg.veo_checkpoint)
            veo_log = run_veo(self.qmodel, self.fp.model, self.qmap, self.batches, spec, self._entropy_grids(),
                              self.progress, self.cancel)
            t = self._tick("veo", t)

        entropies: list[float] = []
        per_sample: list[list[float]] = []
        h0 = None
        blocks = singleton_blocks(len(self.qmap.language))
        percentiles: dict[int, float] = {}
        search_log: list[dict] = []
        with torch.no_grad():
            if self.recipe.cdm and cfg.quantize_language:
                xq0 = self._language_input()
                ep = entropy_pass(self.qmap.language, self.fp.layer_map.language, self.lang_in, xq0, self.lang_in.hidden,
                                  self._entropy_spec(), self.cancel, self.progress)
                entropies = ep.entropies
                per_sample = ep.per_sample.tolist()
                t = self._tick("entropy", t)
                self.timing_details["entropy_eq45"] = round(ep.entropy_seconds, 4)  # part of "entropy"
                h0 = cfg.h0_value(entropies)
                blocks = partition_layers(entropies, h0, cfg.max_block_depth)
                outcomes = search_blocks(self.qmap.language, self.fp.layer_map.language, self.lang_in, xq0,
                                         self.lang_in.hidden, ep.tables, blocks, len(cfg.percentiles),
                                         cfg.joint_search, self.cancel, self.progress)
                for o in outcomes:
                    for j, k in enumerate(o.block):
                        percentiles[k] = float(cfg.percentiles[o.search.choice[j]])
                    search_log.append({"block": o.block, "choice": [float(cfg.percentiles[c]) for c in o.search.choice],
                                       "greedy": [float(cfg.percentiles[c]) for c in o.search.greedy_choice],
                                       "error": o.search.error, "greedy_error": o.search.greedy_error,
                                       "layer_passes": o.search.layer_passes})
                del ep, outcomes
                t = self._tick("search", t)

            report(self.progress, "done", 0.5, "measuring layer errors")
            output_mse = self._measure()
            t = self._tick("measure", t)
        self.timings["total"] = round(time.perf_counter() - t0, 4)
        self._release()
        if cfg.pack_weights:
            pack_model(self.qmodel)
        report(self.progress, "done", 1.0, f"{cfg.recipe} {cfg.bits_label} in {self.timings['total']:.1f} s")
        qhandle = VLMHandle(model=self.qmodel, processor=self.fp.processor, layer_map=build_layer_map(self.qmodel),
                            name=f"{self.fp.name} [{cfg.recipe} {cfg.bits_label}]", source=self.fp.source)
        layer_errors = [self.errors[k] for k in sorted(self.errors, key=lambda k: (k[0] != "vision", k[1]))]
        return QuantResult(handle=qhandle, config=cfg, entropies=entropies, h0=h0, blocks=blocks,
                           percentiles=percentiles, layer_errors=layer_errors, veo_losses=veo_log,
                           timings=dict(self.timings), entropies_per_sample=per_sample if cfg.keep_per_sample_stats else [],
                           search=search_log, init_notes=self.notes, output_mse=output_mse,
                           timing_details=dict(self.timing_details))

    # ------------------------------------------------------------------------------------------
    def _wrap(self) -> None:
        """Replace the Linears to quantize by QuantLinears (weights still FP until their group is visited)."""
        cfg = self.cfg
        qmap = build_layer_map(self.qmodel)
        towers = []
        if cfg.quantize_vision:
            towers.append(("vision", qmap.vision, cfg.act_granularity_vision))
        if cfg.quantize_language:
            towers.append(("language", qmap.language, cfg.act_granularity_language))
        for tower, entries, gran in towers:
            for entry in entries:
                for role, lin in entry.linears.items():
                    q = QuantLinear.wrap(lin, ActQuantizer(cfg.a_bits, gran), tower=tower, role=role)
                    replace_module(self.qmodel, entry.linear_names[role], q)
        self.extras: list[tuple[str, QuantLinear]] = []
        core = getattr(self.qmodel, "model", self.qmodel)
        base = "model." if core is not self.qmodel else ""
        if cfg.quantize_projector:
            for name, mod in core.multi_modal_projector.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    full = f"{base}multi_modal_projector.{name}"
                    q = QuantLinear.wrap(mod, ActQuantizer(cfg.a_bits, "channel"), tower="projector", role=name)
                    replace_module(self.qmodel, full, q)
                    self.extras.append((full, q))
        if cfg.quantize_embeddings:
            emb = self.qmodel.get_input_embeddings()
            emb.weight.data = quantize_weight_uniform(emb.weight.data, cfg.w_bits, None)
            emb._qvlm_w_bits = cfg.w_bits
        self.qmap = build_layer_map(self.qmodel)

    def _init_towers(self) -> None:
        cfg = self.cfg
        awq = ({"grid": cfg.awq_grid, "max_tokens": cfg.awq_max_tokens, "generator": self.gen}
               if self.recipe.awq else None)
        n_total = len(self.qmap.vision) + len(self.qmap.language)
        done = 0
        # vision tower
        xs = xr = self.vis_in.hidden
        for i, entry in enumerate(self.qmap.vision):
            self._check()
            yr = run_layer(self.fp.layer_map.vision[i].module, self.vis_in, xr, self.cancel)
            if cfg.quantize_vision:
                notes = init_layer(entry.module, entry.linears, self.vis_in, xs, self.weights, self.act_init, awq, self.cancel)
                self.notes.update({f"vision.{i}.{k}": v for k, v in notes.items()})
            ys = run_layer(entry.module, self.vis_in, xs, self.cancel)
            self._record("vision", i, ys, yr, self.vis_in, "init_mse")
            xs, xr = ys, yr
            done += 1
            report(self.progress, "init", done / n_total, f"vision layer {i + 1}/{len(self.qmap.vision)}")
        del xs, xr
        for full, q in self.extras:
            self._init_extra(q)
        # language model
        xs = self._language_input()
        xr = self.lang_in.hidden
        self.residual_grids = []
        for i, entry in enumerate(self.qmap.language):
            self._check()
            self.residual_grids.append(residual_grid(xs, self.lang_in.masks, cfg.a_bits))
            yr = run_layer(self.fp.layer_map.language[i].module, self.lang_in, xr, self.cancel)
            if cfg.quantize_language:
                notes = init_layer(entry.module, entry.linears, self.lang_in, xs, self.weights, self.act_init, awq, self.cancel)
                self.notes.update({f"language.{i}.{k}": v for k, v in notes.items()})
            ys = run_layer(entry.module, self.lang_in, xs, self.cancel)
            self._record("language", i, ys, yr, self.lang_in, "init_mse")
            if cfg.pack_weights:
                # A decoder layer's weights are final after its init (VEO and CDM move activation
                # ranges only), so it is packed now: the copy never holds the LLM's weights decoded.
                pack_model(entry.module)
                # Point the map at the packed layers, or it keeps the decoded QuantLinears alive.
                entry.linears = {role: self.qmodel.get_submodule(name) for role, name in entry.linear_names.items()}
            xs, xr = ys, yr
            done += 1
            report(self.progress, "init", done / n_total, f"language layer {i + 1}/{len(self.qmap.language)}")
        if cfg.quantize_lm_head:
            q = QuantLinear.wrap(self.qmodel.lm_head, ActQuantizer(cfg.a_bits, "channel"), tower="lm_head", role="lm_head")
            self.qmodel.lm_head = q
            self._init_extra(q)

    def _init_extra(self, q: QuantLinear) -> None:
        """Weights + ranges of a Linear outside the layer stacks (projector, lm_head), from one pass.

        The pass stops right after ``q`` (a hook on it), so a projector costs only the vision tower.
        """
        from qvlm.quant.calibration import StopForward

        q.quantize_weight_(self.cfg.w_bits, self.weights.fmt, self.weights.group_size)

        def stop(module, args, output):
            raise StopForward

        handle = q.register_forward_hook(stop)
        try:
            with observing([q.act]):
                for b in self.batches:
                    self._check()
                    try:
                        self.qmodel(**b.model_inputs(), use_cache=False)
                    except StopForward:
                        pass
                view = torch.cat([q.act.stat_view(r, b.valid) for r, b in zip(q.act.records, self.batches)])
        finally:
            handle.remove()
        release_records([q.act])
        lo, hi = minmax_ranges(view)
        if self.act_init.method == "lp":
            lo, hi, _ = lp_clip_search(view, q.act.bits, self.act_init.grid, self.act_init.p, lo, hi)
        q.act.set_range(lo, hi)

    def _language_input(self) -> list[torch.Tensor]:
        """Quantized-path input of decoder layer 0 (after the current quantized vision tower/projector)."""
        (cap,) = capture_layer_inputs(self.qmodel, [self.qmap.language[0].module], self.batches, [True], self.cancel)
        return cap.hidden

    def _entropy_spec(self) -> EntropySpec:
        c = self.cfg
        return EntropySpec(c.a_bits, tuple(c.percentiles), c.percentile_source, c.entropy_site, c.soft_temperature,
                           c.soft_delta_mode)

    def _entropy_grids(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        grids = []
        for i, entry in enumerate(self.qmap.language):
            q = entry.linears.get("q")
            act = getattr(q, "act", None)
            if self.cfg.entropy_site == "attn_input" and act is not None and act.calibrated:
                grids.append((act._scale.detach(), act._zp.detach().float()))
            else:
                grids.append(self.residual_grids[i])
        return grids

    def _record(self, tower: str, i: int, ys, yr, inputs: LayerInputs, key: str) -> None:
        err = torch.cat([per_sample_mse(y, r, m) for y, r, m in zip(ys, yr, inputs.masks)]).mean().item()
        row = self.errors.setdefault((tower, i), {"tower": tower, "index": i})
        if "fp_mse" not in row:
            row["fp_mse"] = torch.cat([per_sample_power(r, m) for r, m in zip(yr, inputs.masks)]).mean().item()
        row[key] = err

    def _measure(self) -> float:
        """quant_mse per layer for the final model, and the error of the LLM's last hidden state."""
        xs = xr = self.vis_in.hidden
        for i, entry in enumerate(self.qmap.vision):
            self._check()
            yr = run_layer(self.fp.layer_map.vision[i].module, self.vis_in, xr, self.cancel)
            ys = run_layer(entry.module, self.vis_in, xs, self.cancel)
            self._record("vision", i, ys, yr, self.vis_in, "quant_mse")
            xs, xr = ys, yr
        xs, xr = self._language_input(), self.lang_in.hidden
        for i, entry in enumerate(self.qmap.language):
            self._check()
            yr = run_layer(self.fp.layer_map.language[i].module, self.lang_in, xr, self.cancel)
            ys = run_layer(entry.module, self.lang_in, xs, self.cancel)
            self._record("language", i, ys, yr, self.lang_in, "quant_mse")
            xs, xr = ys, yr
            report(self.progress, "done", 0.5 + 0.5 * (i + 1) / len(self.qmap.language), "measuring layer errors")
        for row in self.errors.values():
            row["rel_err"] = row.get("quant_mse", 0.0) / max(row.get("fp_mse", 0.0), 1e-30)
        core = getattr(self.qmodel, "model", self.qmodel)
        norm = getattr(core.language_model, "norm", None)
        if norm is None:
            return None
        fp_norm = getattr(self.fp.model, "model", self.fp.model).language_model.norm
        errs = [per_sample_mse(norm(y), fp_norm(r), m) for y, r, m in zip(xs, xr, self.lang_in.masks)]
        return float(torch.cat(errs).mean())

    def _release(self) -> None:
        for attr in ("vis_in", "lang_in", "batches"):
            if hasattr(self, attr):
                delattr(self, attr)


__all__ = ["Cancelled", "QuantResult", "quantize"]
