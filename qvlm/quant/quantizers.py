"""Fake quantizers: uniform asymmetric (weights and activations) and NormalFloat (weights).

Everything is *simulated* quantization (quantize -> dequantize in floating point), as in the
paper and the authors' code: the accuracy effect is exact, the speed/memory effect is not.

Uniform asymmetric quantizer for b bits and a range [lo, hi] (design note §2.2, written in the
usual unsigned form, identical to the authors' signed form):

    lo' = min(lo, 0), hi' = max(hi, 0)       (0 must be exactly representable: padding, ReLU)
    Delta = (hi' - lo') / (2^b - 1)          step
    zp    = round(-lo' / Delta)              integer zero point in [0, 2^b - 1]
    q     = clamp(round(x / Delta) + zp, 0, 2^b - 1)
    x_hat = (q - zp) * Delta

Because the zero point is an integer, the representable grid is [(0-zp)*Delta, (2^b-1-zp)*Delta],
within Delta/2 of [lo', hi']; inside the grid the error is at most Delta/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

Granularity = Literal["channel", "token", "tensor"]
EPS = 1e-8


def valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, C] rows of ``x`` ([B, T, C] or [N, C]), real (unpadded) tokens only.

    Why one helper: every range, table and grid is taken over the tokens the model really sees;
    a padded position counted once would move a min/max range.
    """
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------
# uniform asymmetric
# ----------------------------------------------------------------------------------------------

def qmax_of(bits: int) -> int:
    return (1 << bits) - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, integer zero point as float) for ranges ``lo``/``hi`` (any broadcastable shape)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / qmax_of(bits)).clamp_min(EPS)
    zp = torch.round(-lo / scale).clamp(0, qmax_of(bits))
    return scale, zp


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with explicit (broadcastable) step and zero point."""
    q = torch.clamp(torch.round(x / scale) + zp, 0, qmax_of(bits))
    return (q - zp) * scale


def fake_quant_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    scale, zp = qparams(lo, hi, bits)
    return fake_quant(x, scale, zp, bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable fake quantization: STE through round, true gradient through clamp and Delta.

    Gradients reach ``lo``/``hi`` the LSQ way (through the step and the clipping), which is what
    VEO needs to learn the vision-tower bounds (design note §5.3).
    """
    qmax = qmax_of(bits)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zp = torch.clamp(round_ste(-lo / scale), 0, qmax)
    q = torch.clamp(round_ste(x / scale) + zp, 0, qmax)
    return (q - zp) * scale


@dataclass
class EncodedWeight:
    """A quantized weight as integer codes plus the floats that map them back (what gets stored).

    ``fmt == "uniform"``: w_hat = (codes - zero) * scale, one (scale, zero) per [out, group].
    ``fmt == "nf"``: w_hat = levels[codes] * scale, ``scale`` being each block's absmax.
    """

    fmt: str
    bits: int
    shape: tuple[int, int]
    group: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        out_f, in_f = self.shape
        grouped = self.codes.view(out_f, in_f // self.group, self.group)
        return decode_weight(self.fmt, self.bits, grouped, self.scale, self.zero).reshape(out_f, in_f).to(dtype)


def decode_weight(fmt: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None) -> torch.Tensor:
    """float32 weights from grouped codes: the one place the weight dequantization arithmetic lives,
    shared by the fake quantizer and the packed layer so both compute bit-identical weights."""
    if fmt == "uniform":
        return (codes.float() - zero) * scale
    return normal_float_levels(bits).to(codes.device)[codes.long()] * scale


def encode_uniform(w: torch.Tensor, bits: int, group_size: int | None = None) -> EncodedWeight:
    """Asymmetric round-to-nearest codes with min/max ranges per output channel (or group of inputs)."""
    out_f, in_f = w.shape
    g = _group(in_f, group_size)
    wg = w.float().reshape(out_f, in_f // g, g)
    scale, zp = qparams(wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True), bits)
    codes = torch.clamp(torch.round(wg / scale) + zp, 0, qmax_of(bits))
    return EncodedWeight("uniform", bits, (out_f, in_f), g, codes.to(torch.uint8).reshape(-1), scale, zp)


def quantize_weight_uniform(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest with min/max ranges per output channel (or per group of input elements)."""
    return encode_uniform(w, bits, group_size).decode(w.dtype)


def _group(in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return in_features
    if in_features % group_size:
        raise ValueError(
            f"weight group size {group_size} does not divide a layer's {in_features} input features; "
            "choose a divisor or leave the group size empty (per output channel)"
        )
    return group_size


# ----------------------------------------------------------------------------------------------
# NormalFloat (QLoRA)
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _normal_float_levels(bits: int) -> tuple[float, ...]:
    n_pos = 1 << (bits - 1)
    n_neg = n_pos - 1
    # QLoRA's offset, 1 - (1/(2(2^b-1)) + 1/(2*2^b))/2, generalised from b=4 (0.9677083).
    offset = 1.0 - 0.5 * (1.0 / (2 * (2**bits - 1)) + 1.0 / (2 * 2**bits))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    levels = levels / levels.abs().max()
    return tuple(levels.tolist())


def normal_float_levels(bits: int = 4) -> torch.Tensor:
    """The 2^b NormalFloat levels in [-1, 1] (b=4 gives bitsandbytes' NF4 table)."""
    return torch.tensor(_normal_float_levels(bits), dtype=torch.float32)


def encode_normal_float(w: torch.Tensor, bits: int = 4, block_size: int | None = 64) -> EncodedWeight:
    """Blockwise absmax NormalFloat level indices (QLoRA, no double quantization)."""
    out_f, in_f = w.shape
    g = _group(in_f, block_size or 64)
    wg = w.float().reshape(out_f, in_f // g, g)
    absmax = wg.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    levels = normal_float_levels(bits).to(w.device)
    idx = torch.bucketize((wg / absmax).contiguous(), (levels[1:] + levels[:-1]) / 2)
    return EncodedWeight("nf", bits, (out_f, in_f), g, idx.to(torch.uint8).reshape(-1), absmax)


def quantize_weight_nf(w: torch.Tensor, bits: int = 4, block_size: int | None = 64) -> torch.Tensor:
    """Blockwise absmax NormalFloat round-to-nearest (QLoRA, no double quantization)."""
    return encode_normal_float(w, bits, block_size).decode(w.dtype)


def encode_weight(w: torch.Tensor, bits: int, fmt: str, group_size: int | None) -> EncodedWeight:
    if fmt == "nf4":
        return encode_normal_float(w, bits, group_size)
    return encode_uniform(w, bits, group_size)


def quantize_weight(w: torch.Tensor, bits: int, fmt: str, group_size: int | None) -> torch.Tensor:
    return encode_weight(w, bits, fmt, group_size).decode(w.dtype)


# ----------------------------------------------------------------------------------------------
# activation quantizer
# ----------------------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Static-range fake quantizer of a Linear's input.

    Ranges are per input channel ("channel", LLM), per token position ("token", vision tower:
    the sequence length is fixed there) or one per tensor. During calibration it can *observe*
    its inputs (kept by reference, one per batch) while still quantizing with its current ranges,
    or pass them through untouched if it has none yet. In VEO it becomes *learnable*: the
    log-magnitudes of its bounds are parameters and the forward is differentiable (STE).
    """

    def __init__(self, bits: int, granularity: Granularity) -> None:
        super().__init__()
        self.bits = bits
        self.granularity = granularity
        self.register_buffer("lo", None)
        self.register_buffer("hi", None)
        self.register_buffer("_scale", None, persistent=False)
        self.register_buffer("_zp", None, persistent=False)
        self.enabled = True
        self.observing = False
        self.records: list[torch.Tensor] = []
        self.log_neg_lo: nn.Parameter | None = None
        self.log_hi: nn.Parameter | None = None

    # --- ranges -------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self.lo is not None

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Ranges as 1-D tensors of length G (channels, token positions, or 1)."""
        lo = lo.detach().float().reshape(-1)
        hi = hi.detach().float().reshape(-1)
        self.lo = torch.clamp(lo, max=0.0).clone()
        self.hi = torch.clamp(hi, min=0.0).clone()
        scale, zp = qparams(self.lo, self.hi, self.bits)
        self._scale = scale
        self._zp = zp.to(torch.int32)

    def get_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.log_hi is not None:
            return -torch.exp(self.log_neg_lo), torch.exp(self.log_hi)
        return self.lo, self.hi

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, zero point as float) of the calibrated grid, detached: what Eq. 4 assigns levels on."""
        return self._scale.detach(), self._zp.detach().float()

    def axis(self, x: torch.Tensor) -> int:
        return x.dim() - 1 if self.granularity == "channel" else x.dim() - 2

    # --- observation --------------------------------------------------------------------------
    def stat_view(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` rearranged to [elements, G]: each column holds what one range must cover."""
        if self.granularity == "token":
            t = x.shape[-2]
            return x.transpose(-2, -1).reshape(-1, t)
        rows = valid_rows(x, mask)
        return rows if self.granularity == "channel" else rows.reshape(-1, 1)

    def broadcast_shape(self, x_dim: int, g: int) -> list[int]:
        shape = [1] * x_dim
        if self.granularity == "token":
            shape[x_dim - 2] = g
        elif self.granularity == "channel":
            shape[x_dim - 1] = g
        return shape

    # --- learnable mode (VEO) -----------------------------------------------------------------
    def make_learnable(self) -> list[nn.Parameter]:
        """Turn the current bounds into trainable log-magnitudes (lo = -exp(a), hi = exp(b))."""
        if not self.calibrated:
            raise RuntimeError("cannot learn the bounds of an uncalibrated quantizer")
        span = (self.hi - self.lo).clamp_min(EPS)
        self.log_neg_lo = nn.Parameter(torch.log(torch.clamp(-self.lo, min=1e-3 * span)))
        self.log_hi = nn.Parameter(torch.log(torch.clamp(self.hi, min=1e-3 * span)))
        return [self.log_neg_lo, self.log_hi]

    def freeze(self) -> None:
        """Write learned bounds back as static ranges and drop the parameters."""
        if self.log_hi is None:
            return
        lo, hi = self.get_range()
        self.log_neg_lo = None
        self.log_hi = None
        self.set_range(lo.detach(), hi.detach())

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.records.append(x.detach())
        if not self.enabled or not self.calibrated:
            return x
        if self.log_hi is not None:
            lo, hi = self.get_range()
            shape = self.broadcast_shape(x.dim(), lo.numel())
            return fake_quant_ste(x, lo.view(shape), hi.view(shape), self.bits).to(x.dtype)
        if self.granularity == "tensor":
            return torch.fake_quantize_per_tensor_affine(
                x, float(self._scale), int(self._zp), 0, qmax_of(self.bits)
            )
        axis = self.axis(x)
        if x.shape[axis] != self._scale.numel():
            raise RuntimeError(
                f"activation quantizer calibrated for {self._scale.numel()} "
                f"{'token positions' if self.granularity == 'token' else 'channels'} got {x.shape[axis]}"
            )
        return torch.fake_quantize_per_channel_affine(
            x, self._scale.to(x.device), self._zp.to(x.device), axis, 0, qmax_of(self.bits)
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, calibrated={self.calibrated}"


# ----------------------------------------------------------------------------------------------
# range estimation on observed data ([elements, G] views)
# ----------------------------------------------------------------------------------------------
def minmax_ranges(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return view.amin(dim=0), view.amax(dim=0)


def lp_error(view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, p: float,
             chunk_rows: int = 1 << 16) -> float:
    """mean |Q(x) - x|^p over the view, in row chunks to bound memory."""
    scale, zp = qparams(lo, hi, bits)
    total = 0.0
    for start in range(0, view.shape[0], chunk_rows):
        part = view[start : start + chunk_rows].float()
        err = (fake_quant(part, scale, zp, bits) - part).abs()
        total += float(err.pow(p).sum()) if p != 1.0 else float(err.sum())
    return total / max(1, view.numel())


def lp_clip_search(view: torch.Tensor, bits: int, grid: tuple[float, ...], p: float,
                   lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Layer-wise clipping (paper Eq. 2 with the lp distance of §4.1): shrink min/max by a common
    factor from ``grid``; return the best (lo, hi) and its factor."""
    if lo is None or hi is None:
        lo, hi = minmax_ranges(view)
    best = (lo, hi, 1.0)
    best_err = math.inf
    for s in grid:
        err = lp_error(view, lo * s, hi * s, bits, p)
        if err < best_err:
            best_err = err
            best = (lo * s, hi * s, s)
    return best


def percentile_ranges(view: torch.Tensor, percentiles: tuple[float, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per column: (quantile_{1-p}, quantile_p) for each p, linear interpolation between order statistics."""
    n = view.shape[0]
    srt = view.float().sort(dim=0).values
    out = []
    for p in percentiles:
        out.append((_order_stat(srt, (1.0 - p) * (n - 1)), _order_stat(srt, p * (n - 1))))
    return out


def _order_stat(srt: torch.Tensor, pos: float) -> torch.Tensor:
    lo_i = int(math.floor(pos))
    hi_i = min(lo_i + 1, srt.shape[0] - 1)
    frac = pos - lo_i
    return srt[lo_i] + (srt[hi_i] - srt[lo_i]) * frac
