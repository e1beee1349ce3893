"""Layer-wise initialization, the first stage of every recipe (paper §4.1, the QLoRA-style init).

:class:`LayerwiseInit` wraps the Linears to quantize (vision tower, LLM decoder, optionally the
projector and lm_head) in :class:`QuantLinear` and initializes them tower by tower, layer by
layer, on the *quantized* path (each layer gets the output of the already-quantized layers
below, the propagation constraint of Eq. 1).

Inside a layer the Linears are visited in call order, grouped by the input they share (q/k/v;
o; gate/up; down for Llama; q/k/v; out; fc1; fc2 for CLIP). For each group, one pass over the
calibration set records the group's input *with every earlier group already quantized* (the
forward stops right after the group), then

1. the group's weights are quantized (RTN / NormalFloat, or AWQ-scaled for the AWQ recipe),
2. its activation ranges are set: min/max ("rtn"), then for the other recipes the layer-wise
   lp clipping search (paper Eq. 2 with the lp distance of §4.1, the "QLoRA" initialization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from qvlm.utils.progress import STAGE_INIT, StepProgress, check_cancel
from qvlm.quant.awq import awq_scale_search
from qvlm.quant.config import QuantConfig
from qvlm.quant.entropy import residual_grid
from qvlm.quant.calibration import LayerInputs, StopForward, call_layer, observing, release_records, run_layer
from qvlm.quant.packing import pack_model
from qvlm.quant.qlinear import QuantLinear, replace_module
from qvlm.quant.vision_ranges import rotate_inputs
from qvlm.quant.quantizers import (
    ActQuantizer,
    dynamic_clip_search,
    lp_clip_search,
    minmax_ranges,
    quantize_weight_uniform,
    valid_rows,
)

if TYPE_CHECKING:
    from qvlm.quant.run import QuantRun

WeightFormat = Literal["uniform", "nf4"]
ActInit = Literal["minmax", "lp"]
WeightScaling = Literal["none", "awq"]


def call_order_groups(layer: torch.nn.Module, linears: dict[str, QuantLinear], inputs: LayerInputs,
                      x0: torch.Tensor) -> list[list[str]]:
    """Roles grouped by shared input tensor, in call order (found by one pass on the first batch)."""
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: identity, not id() (ids get reused)
    hooks = []
    for role, lin in linears.items():
        hooks.append(lin.register_forward_pre_hook(lambda m, a, role=role: calls.append((role, a[0]))))
    try:
        with torch.no_grad():
            call_layer(layer, x0, inputs, 0)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    seen = set()
    for role, tensor in calls:
        if role in seen:
            continue
        seen.add(role)
        if groups and tensor is last:
            groups[-1].append(role)
        else:
            groups.append([role])
        last = tensor
    missing = [r for r in linears if r not in seen]
    if missing:
        groups.append(missing)
    return groups


def _stop_hook(module, args):
    raise StopForward


def record_group_inputs(layer: torch.nn.Module, linears: dict[str, QuantLinear], group: list[str],
                        stop_role: str | None, inputs: LayerInputs, xs: list[torch.Tensor],
                        cancel=None) -> list[torch.Tensor]:
    """The (pre-smoothing) input of ``group`` for every batch, the forward stopping at ``stop_role``."""
    probe = linears[group[0]].act
    hook = linears[stop_role].register_forward_pre_hook(_stop_hook) if stop_role else None
    try:
        with torch.no_grad(), observing([probe]):
            for i, x in enumerate(xs):
                check_cancel(cancel, "quantization")
                try:
                    call_layer(layer, x, inputs, i)
                except StopForward:
                    pass
            records = list(probe.records)
        release_records([probe])
    finally:
        if hook is not None:
            hook.remove()
    return records


@torch.no_grad()
def init_layer(layer: torch.nn.Module, linears: dict[str, QuantLinear], inputs: LayerInputs,
               xs: list[torch.Tensor], *, w_bits: int, w_format: str, w_group: int | None, act_init: ActInit,
               clip_grid: tuple[float, ...], lp_norm: float, awq: dict | None = None, dynamic_clip: bool = False,
               cancel=None) -> dict:
    """Quantize the weights and set the activation ranges of every Linear of ``layer``.

    ``awq`` (for the AWQ recipe): {"grid": int, "max_tokens": int, "generator": torch.Generator}. A group whose
    input is rotated (``vision_rotation``) gets no AWQ smoothing: both reshape the input channels, and the
    rotation already spreads the outlier channels that smoothing would scale down.
    ``dynamic_clip``: a dynamic (per-token, run-time) input range gets one clip factor from ``clip_grid`` by the lp
    distance (``QuantConfig.act_dynamic_clip="lp"``, with the "lp" init); else it is left as each row's min/max.
    Returns per-group notes (clip factor, AWQ alpha) for the result statistics.
    """
    groups = call_order_groups(layer, linears, inputs, xs[0])
    clip_dynamic = dynamic_clip and act_init == "lp"
    notes: dict = {}
    for gi, group in enumerate(groups):
        check_cancel(cancel, "quantization")
        stop_role = groups[gi + 1][0] if gi + 1 < len(groups) else None
        records = record_group_inputs(layer, linears, group, stop_role, inputs, xs, cancel)
        q0 = linears[group[0]].act
        smooth = None
        if awq is not None and (q0 is None or q0.rotation is None):  # a rotated input is already spread out
            rows = torch.cat([valid_rows(r, m) for r, m in zip(records, inputs.masks)])
            if rows.shape[0] > awq["max_tokens"]:
                idx = torch.randperm(rows.shape[0], generator=awq["generator"])[: awq["max_tokens"]]
                rows = rows[idx.to(rows.device)]
            smooth, alpha = awq_scale_search(rows, [linears[r].weight.data for r in group], w_bits,
                                             w_format, w_group, awq["grid"])
            notes[f"{'/'.join(group)}.awq_alpha"] = alpha
        for role in group:
            linears[role].quantize_weight_(w_bits, w_format, w_group, smooth)
        if q0 is None or (q0.dynamic and not clip_dynamic):  # each row's own range at run time: nothing to set
            continue
        if smooth is not None:
            s = smooth.to(records[0].dtype)
            records = [r / s for r in records]
        if q0.dynamic:
            rows = torch.cat([valid_rows(r, m) for r, m in zip(records, inputs.masks)])
            factor = dynamic_clip_search(rows, q0.bits, clip_grid, lp_norm)
            for role in group:
                linears[role].act.set_clip(factor)
            notes[f"{'/'.join(group)}.clip"] = factor
            del records, rows
            continue
        view = torch.cat([q0.stat_view(r, m) for r, m in zip(records, inputs.masks)])
        lo, hi = minmax_ranges(view)
        if act_init == "lp":
            lo, hi, factor = lp_clip_search(view, q0.bits, clip_grid, lp_norm, lo, hi)
            notes[f"{'/'.join(group)}.clip"] = factor
        for role in group:
            linears[role].act.set_range(lo, hi)
        del records, view
    return notes


@dataclass(frozen=True)
class LayerwiseInit:
    """Wrap, quantize the weights and initialize every activation range, layer by layer.

    A configured stage. Its first four fields are what distinguishes the recipes' starting points (a recipe
    fixes them; the saved config records the recipe's name); the others are saved in the run's config under the
    names of :data:`SAVED_AS`, where each default's reason is written (``QuantConfig.init_lp_norm``, ...). The
    bits, the formats and what is quantized stay the run's (both towers and every stage share them).
    """

    name: ClassVar[str] = STAGE_INIT
    SAVED_AS: ClassVar[dict[str, str]] = {"clip_grid": "init_clip_grid", "lp_norm": "init_lp_norm",
                                          "awq_grid": "awq_grid", "awq_max_tokens": "awq_max_tokens"}
    """Field -> its name in the saved (flat) config."""
    weights: WeightFormat = "nf4"
    """Weight format when ``QuantConfig.weight_format == "auto"``."""
    weight_group: int | None = None
    """Uniform weights' group when ``QuantConfig.weight_group_size`` is None (None: per output
    channel). NormalFloat always defaults to QLoRA's block of 64."""
    act_init: ActInit = "lp"
    """"minmax" ranges, or min/max then the lp clipping search (the QLoRA-style init)."""
    scaling: WeightScaling = "none"
    """"awq": AWQ's activation-aware per-channel scale search before the weights are quantized."""
    clip_grid: tuple[float, ...] = QuantConfig.init_clip_grid
    lp_norm: float = QuantConfig.init_lp_norm
    awq_grid: int = QuantConfig.awq_grid
    awq_max_tokens: int = QuantConfig.awq_max_tokens

    def resolve_weights(self, cfg: "QuantConfig") -> tuple[str, int | None]:
        """(weight format, group size) this step uses under ``cfg``: the config's, else its own."""
        fmt = self.weights if cfg.weight_format == "auto" else cfg.weight_format
        if cfg.weight_group_size is not None:
            return fmt, cfg.weight_group_size
        return fmt, 64 if fmt == "nf4" else self.weight_group

    def run(self, qrun: "QuantRun") -> None:
        with qrun.timed(STAGE_INIT), torch.no_grad():
            qrun.report(STAGE_INIT, 0.0, "wrapping the Linears")
            projector = self._wrap(qrun)
            self._init_towers(qrun, projector)

    # ------------------------------------------------------------------------------------------
    def _wrap(self, qrun: "QuantRun") -> list[QuantLinear]:
        """Replace the Linears to quantize by QuantLinears (weights still FP until their group is visited)."""
        cfg, model = qrun.config, qrun.qmodel
        towers = []
        if cfg.quantize_vision:
            towers.append(("vision", qrun.qmap.vision, cfg.act_granularity_vision))
        if cfg.quantize_language:
            towers.append(("language", qrun.qmap.language, cfg.act_granularity_language))
        vision_linears: list[QuantLinear] = []
        for tower, entries, granularity in towers:
            for entry in entries:
                for role, lin in entry.linears.items():
                    act = ActQuantizer(cfg.tower_bits(tower)[1], granularity)
                    q = QuantLinear.wrap(lin, act, tower=tower, role=role)
                    replace_module(model, entry.linear_names[role], q)
                    if tower == "vision":
                        vision_linears.append(q)
        if cfg.vision_rotation != "none":
            rotate_inputs(vision_linears, cfg.vision_rotation, cfg.seed)
        projector: list[QuantLinear] = []
        if cfg.quantize_projector:
            for name, mod in qrun.qmap.projector.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    q = QuantLinear.wrap(mod, ActQuantizer(cfg.a_bits, "channel"), tower="projector", role=name)
                    replace_module(model, f"{qrun.qmap.projector_name}.{name}", q)
                    projector.append(q)
        if cfg.quantize_embeddings:
            emb = model.get_input_embeddings()
            emb.weight.data = quantize_weight_uniform(emb.weight.data, cfg.w_bits, None)
            emb._qvlm_w_bits = cfg.w_bits
        qrun.refresh_layer_map()
        return projector

    def _init_towers(self, qrun: "QuantRun", projector: list[QuantLinear]) -> None:
        cfg = qrun.config
        w_format, w_group = self.resolve_weights(cfg)
        settings = dict(w_format=w_format, w_group=w_group, act_init=self.act_init,
                        clip_grid=tuple(self.clip_grid), lp_norm=self.lp_norm,
                        dynamic_clip=cfg.act_dynamic_clip == "lp", cancel=qrun.cancel)
        if self.scaling == "awq":
            settings["awq"] = {"grid": self.awq_grid, "max_tokens": self.awq_max_tokens, "generator": qrun.generator}
        fp_map, qmap = qrun.fp.layer_map, qrun.qmap
        # One step per layer, per projector Linear and for lm_head: 1.0 only once the last is done.
        steps = StepProgress(qrun.progress, STAGE_INIT, len(qmap.vision) + len(projector) + len(qmap.language)
                             + int(cfg.quantize_lm_head))
        towers = (("vision", qmap.vision, fp_map.vision, qrun.vision_inputs, cfg.quantize_vision),
                  ("language", qmap.language, fp_map.language, qrun.language_inputs, cfg.quantize_language))
        for tower, entries, fp_entries, inputs, quantized in towers:
            if tower == "language":
                for q in projector:  # the projector sits between the towers: init it once vision is final
                    self._init_outside_stacks(qrun, q, w_format, w_group)
                    steps.step(f"projector {q.role}")
                xs = qrun.language_input()
            else:
                xs = inputs.hidden
            xr = inputs.hidden
            for i, entry in enumerate(entries):
                qrun.check_cancel()
                if tower == "language":
                    qrun.residual_grids.append(residual_grid(xs, inputs.masks, cfg.a_bits))
                yr = run_layer(fp_entries[i].module, inputs, xr, qrun.cancel)
                if quantized:
                    notes = init_layer(entry.module, entry.linears, inputs, xs, w_bits=cfg.tower_bits(tower)[0],
                                       **settings)
                    qrun.notes.init.update({f"{tower}.{i}.{k}": v for k, v in notes.items()})
                ys = run_layer(entry.module, inputs, xs, qrun.cancel)
                qrun.record_error(tower, i, ys, yr, inputs, "init_mse")
                if tower == "language" and cfg.pack_weights:
                    # A decoder layer's weights are final after its init (VEO and CDM move activation
                    # ranges only), so it is packed now: the copy never holds the LLM's weights decoded.
                    pack_model(entry.module)
                    # Point the map at the packed layers, or it keeps the decoded QuantLinears alive.
                    entry.linears = {role: qrun.qmodel.get_submodule(name) for role, name in entry.linear_names.items()}
                xs, xr = ys, yr
                steps.step(f"{tower} layer {i + 1}/{len(entries)}")
        if cfg.quantize_lm_head:
            q = QuantLinear.wrap(qrun.qmodel.lm_head, ActQuantizer(cfg.a_bits, "channel"), tower="lm_head",
                                 role="lm_head")
            qrun.qmodel.lm_head = q
            self._init_outside_stacks(qrun, q, w_format, w_group)
            steps.step("lm_head")

    def _init_outside_stacks(self, qrun: "QuantRun", q: QuantLinear, w_format: str, w_group: int | None) -> None:
        """Weights + ranges of a Linear outside the layer stacks (projector, lm_head), from one pass.

        The pass stops right after ``q`` (a hook on it), so a projector costs only the vision tower.
        """
        cfg = qrun.config
        q.quantize_weight_(cfg.w_bits, w_format, w_group)

        def stop(module, args, output):
            raise StopForward

        handle = q.register_forward_hook(stop)
        try:
            with observing([q.act]):
                for b in qrun.batches:
                    qrun.check_cancel()
                    try:
                        qrun.qmodel(**b.model_inputs(), use_cache=False)
                    except StopForward:
                        pass
                view = torch.cat([q.act.stat_view(r, b.valid) for r, b in zip(q.act.records, qrun.batches)])
        finally:
            handle.remove()
        release_records([q.act])
        lo, hi = minmax_ranges(view)
        if self.act_init == "lp":
            lo, hi, _ = lp_clip_search(view, q.act.bits, tuple(self.clip_grid), self.lp_norm, lo, hi)
        q.act.set_range(lo, hi)
