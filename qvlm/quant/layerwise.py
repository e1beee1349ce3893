"""Layer-wise initialization of one transformer layer on the quantized path (design note §8.3 step 2).

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

import torch

from qvlm.quant.awq import awq_scale_search
from qvlm.quant.calibration import LayerInputs, StopForward, observing, release_records
from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import lp_clip_search, minmax_ranges
from qvlm.progress import check_cancel


@dataclass
class WeightSpec:
    bits: int
    fmt: str
    group_size: int | None


@dataclass
class ActInitSpec:
    method: str  # "minmax" | "lp"
    grid: tuple[float, ...]
    p: float


def call_order_groups(layer: torch.nn.Module, linears: dict[str, QuantLinear], inputs: LayerInputs,
                      x0: torch.Tensor) -> list[list[str]]:
    """Roles grouped by shared input tensor, in call order (found by one pass on the first batch)."""
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: identity, not id() (ids get reused)
    hooks = []
    for role, lin in linears.items():
        hooks.append(lin.register_forward_pre_hook(lambda m, a, role=role: calls.append((role, a[0]))))
    try:
        with torch.no_grad():
            from qvlm.quant.calibration import call_layer

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
    from qvlm.quant.calibration import call_layer

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
               xs: list[torch.Tensor], weights: WeightSpec, act: ActInitSpec, awq: dict | None = None,
               cancel=None) -> dict:
    """Quantize the weights and set the activation ranges of every Linear of ``layer``.

    ``awq`` (for the AWQ recipe): {"grid": int, "max_tokens": int, "generator": torch.Generator}.
    Returns per-group notes (clip factor, AWQ alpha) for the result statistics.
    """
    groups = call_order_groups(layer, linears, inputs, xs[0])
    notes: dict = {}
    for gi, group in enumerate(groups):
        check_cancel(cancel, "quantization")
        stop_role = groups[gi + 1][0] if gi + 1 < len(groups) else None
        records = record_group_inputs(layer, linears, group, stop_role, inputs, xs, cancel)
        q0 = linears[group[0]].act
        smooth = None
        if awq is not None:
            rows = torch.cat([q_rows(q0, r, m) for r, m in zip(records, inputs.masks)])
            if rows.shape[0] > awq["max_tokens"]:
                idx = torch.randperm(rows.shape[0], generator=awq["generator"])[: awq["max_tokens"]]
                rows = rows[idx.to(rows.device)]
            smooth, alpha = awq_scale_search(rows, [linears[r].weight.data for r in group], weights.bits,
                                             weights.fmt, weights.group_size, awq["grid"])
            notes[f"{'/'.join(group)}.awq_alpha"] = alpha
        for role in group:
            linears[role].quantize_weight_(weights.bits, weights.fmt, weights.group_size, smooth)
        if q0 is None:
            continue
        if smooth is not None:
            s = smooth.to(records[0].dtype)
            records = [r / s for r in records]
        view = torch.cat([q0.stat_view(r, m) for r, m in zip(records, inputs.masks)])
        lo, hi = minmax_ranges(view)
        if act.method == "lp":
            lo, hi, factor = lp_clip_search(view, q0.bits, act.grid, act.p, lo, hi)
            notes[f"{'/'.join(group)}.clip"] = factor
        for role in group:
            linears[role].act.set_range(lo, hi)
        del records, view
    return notes


def q_rows(q, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, channels] rows of an input (valid tokens only), whatever the quantizer's granularity."""
    c = x.shape[-1]
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        return x[mask].reshape(-1, c)
    return x.reshape(-1, c)
