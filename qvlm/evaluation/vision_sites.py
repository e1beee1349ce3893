"""Where the vision tower loses: the error each activation-quantizer site of the vision tower adds on its own.

A site is one input that a vision layer's activation quantizers round: the input of q/k/v (one site:
the three projections read the same LayerNorm output), of out_proj, of fc1 and of fc2. For each site,
:func:`vision_site_errors` runs the quantized variant with ONLY that site's activation quantizers on
(every other activation quantizer of the model off; the weights stay as the variant quantized them)
and measures the error of the projector output (the image tokens the LLM sees, X^v of Eq. 9)
against the FP model's. Subtracting the weights-only error (every activation quantizer off) leaves
what the site's rounding adds.

:func:`site_activation_map` shows why a site loses: the FP activation |x| at the site, token x
channel, with the ranges a static per-token range (the paper's vision choice, §4.3) and a static
per-channel range would get. After a LayerNorm a few channels are large in every token, so each
token's range is stretched by them and the ordinary channels fall on a handful of levels.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from qvlm.models import VLMHandle
from qvlm.quant.calibration import CalibBatch, StopForward, calibration_batches
from qvlm.quant.quantizers import ActQuantizer, qparams
from qvlm.utils.progress import STAGE_VISION_SITES, ProgressCallback, check_cancel, report
from qvlm.utils.records import JsonRecord


SITE_ROLES: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "out_proj": ("o",), "fc1": ("fc1",),
                                          "fc2": ("fc2",)}
"""Site -> the layer-map roles (:data:`qvlm.models.layer_map.VISION_STYLES`) whose input it is."""

SITE_SAMPLES = (1, 32)
"""Calibration pairs allowed: one vision pass per site and pair, so more only slows the view."""


@dataclass(frozen=True)
class SiteError:
    """What one vision site's activation quantizers add alone to the projector output's error.

    ``error``: the relative MSE (MSE / mean square of the FP output) with only that site on, minus the
    weights-only error; ``share``: its part of the sum over sites.
    """

    layer: int
    site: str
    error: float
    share: float


@dataclass
class VisionSiteReport(JsonRecord):
    """Per vision site, the projector-output error its activation quantizers add alone.

    ``all_on``: the relative error with every vision activation quantizer on.
    """

    rows: list[SiteError]
    weights_only: float
    all_on: float
    samples: int
    a_bits: int
    weights: str = "as quantized"
    output: str = "projector"

    def worst(self) -> SiteError:
        return max(self.rows, key=lambda r: r.error)


def _site_quantizers(handle: VLMHandle) -> dict[tuple[int, str], list[Any]]:
    """(vision layer, site) -> the activation quantizers of the Linears reading that site's input."""
    sites = {}
    for entry in handle.layer_map.vision:
        for site, roles in SITE_ROLES.items():
            acts = [getattr(entry.linears.get(role), "act", None) for role in roles]
            acts = [a for a in acts if isinstance(a, ActQuantizer) and a.calibrated]
            if acts:
                sites[(entry.index, site)] = acts
    return sites


def _all_quantizers(model: torch.nn.Module) -> list[Any]:
    """Every activation quantizer of the model (vision, LLM, projector, lm_head)."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


@contextmanager
def _only(all_acts: list[Any], on: list[Any]) -> Iterator[None]:
    """Switch every quantizer in ``all_acts`` off except those in ``on``; restore their states after."""
    before = [a.enabled for a in all_acts]
    keep = {id(a) for a in on}
    try:
        for a in all_acts:
            a.enabled = id(a) in keep
        yield
    finally:
        for a, state in zip(all_acts, before):
            a.enabled = state


@torch.no_grad()
def projector_output(handle: VLMHandle, batch: CalibBatch) -> torch.Tensor:
    """The projector's output for one batch (the image tokens the LLM sees); the LLM is never run."""
    return run_until(handle.model, handle.layer_map.projector, batch, take_input=False).float()


def run_until(model: torch.nn.Module, module: torch.nn.Module, batch: CalibBatch, take_input: bool) -> torch.Tensor:
    """``module``'s first input (``take_input``) or its output on ``batch``; the forward stops right there."""
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_module, args):
        seen["x"] = args[0]
        raise StopForward

    def keep_output(_module, _args, output):
        seen["x"] = output
        raise StopForward

    hook = module.register_forward_pre_hook(keep_input) if take_input else module.register_forward_hook(keep_output)
    try:
        model(**batch.model_inputs(), use_cache=False)
    except StopForward:
        pass
    finally:
        hook.remove()
    return seen["x"]


def _relative_mse(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12))


def _check_samples(n: Any) -> int:
    lo, hi = SITE_SAMPLES
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise ValueError(f"Use {lo} to {hi} calibration pairs for the vision sites.")
    return n


@torch.no_grad()
def vision_site_errors(fp: VLMHandle, quantized: Any, n_samples: int = 4, seed: int = 0,
                       progress: ProgressCallback | None = None,
                       cancel: threading.Event | None = None) -> VisionSiteReport:
    """The projector-output error each vision site's activation quantizers add alone, on ``n_samples`` pairs.

    ``quantized``: the variant's :class:`~qvlm.quant.QuantResult`. Its quantizers are switched on
    and off in place and restored before returning, so the variant answers as before afterwards
    (a caller must not answer with it meanwhile: the app runs this as a long job).
    """
    n = _check_samples(n_samples)
    handle = quantized.handle
    sites = _site_quantizers(handle)
    if not sites:
        raise ValueError("This variant's vision tower has no activation quantizers (it was kept in full precision), "
                         "so no vision site loses anything.")
    (batch,) = calibration_batches(fp, n, seed, batch_size=n)
    reference = projector_output(fp, batch)
    all_acts = _all_quantizers(handle.model)
    vision_acts = [a for acts in sites.values() for a in acts]

    def error_with(on: list[Any]) -> float:
        check_cancel(cancel, "vision-site measurement")
        with _only(all_acts, on):
            return _relative_mse(projector_output(handle, batch), reference)

    weights_only = error_with([])
    errors = {}
    for i, ((layer, site), acts) in enumerate(sites.items()):
        errors[layer, site] = max(0.0, error_with(acts) - weights_only)
        report(progress, STAGE_VISION_SITES, (i + 1) / (len(sites) + 1), f"vision layer {layer}, {site} input")
    all_on = error_with(vision_acts)
    report(progress, STAGE_VISION_SITES, 1.0, "every vision site on")
    total = sum(errors.values())
    rows = [SiteError(layer, site, e, e / total if total > 0 else 0.0) for (layer, site), e in errors.items()]
    cfg = quantized.config
    return VisionSiteReport(rows=rows, weights_only=weights_only, all_on=all_on, samples=n,
                            a_bits=cfg.tower_bits("vision")[1])


@dataclass(frozen=True)
class SiteMap:
    """|x| at one vision site, token x channel (``abs``: [T][C] of the first image), and its static ranges.

    ``token_range`` / ``channel_range``: max - min per token position / per channel over the images;
    ``levels_token`` / ``levels_channel``: how many of the ``bits``-bit levels a typical value spans with each.
    """

    layer: int
    site: str
    bits: int
    samples: int
    abs: list[list[float]]
    token_range: list[float]
    channel_range: list[float]
    levels_token: float
    levels_channel: float


@torch.no_grad()
def site_activation_map(fp: VLMHandle, layer: int, site: str, bits: int, n_samples: int = 4,
                        seed: int = 0) -> SiteMap:
    """|x| at one vision site of the FP model, token x channel, with static per-token and per-channel ranges.

    Ranges are min/max over ``n_samples`` calibration images (per token position over every channel,
    per channel over every token), as a static range would be calibrated. ``levels_token`` /
    ``levels_channel``: the median |x| / step, i.e. how many of the ``bits``-bit levels a typical
    value spans with each kind of range (few levels = coarse rounding). ``abs``: [T, C] of the
    first image, the heatmap.
    """
    if site not in SITE_ROLES:
        raise ValueError(f"Unknown vision site {site!r}; choose one of: {', '.join(SITE_ROLES)}.")
    entries = fp.layer_map.vision
    if not 0 <= layer < len(entries):
        raise ValueError(f"The vision tower has layers 0 to {len(entries) - 1}.")
    n = _check_samples(n_samples)
    (batch,) = calibration_batches(fp, n, seed, batch_size=n)
    linear = entries[layer].linears[SITE_ROLES[site][0]]
    x = run_until(fp.model, linear, batch, take_input=True).detach().float()  # [B, T, C]
    token_lo, token_hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    channel_lo, channel_hi = x.amin(dim=(0, 1)), x.amax(dim=(0, 1))
    token_step, _ = qparams(token_lo, token_hi, bits)
    channel_step, _ = qparams(channel_lo, channel_hi, bits)
    magnitude = x.abs()
    return SiteMap(layer=layer, site=site, bits=bits, samples=n, abs=magnitude[0].tolist(),
                   token_range=(token_hi - token_lo).tolist(), channel_range=(channel_hi - channel_lo).tolist(),
                   levels_token=float((magnitude / token_step.view(1, -1, 1)).median()),
                   levels_channel=float((magnitude / channel_step.view(1, 1, -1)).median()))
