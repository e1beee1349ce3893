"""Fake quantizers: uniform asymmetric (weights and activations) and NormalFloat (weights).

Everything is *simulated* quantization (quantize -> dequantize in floating point), as in the
paper and the authors' code: the accuracy effect is exact, the speed/memory effect is not.

Uniform asymmetric quantizer for b bits and a range [lo, hi] (paper §3.1, written in the usual
unsigned form, identical to the authors' signed form):

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
import torch.nn.functional as F
from torch import nn

Granularity = Literal["channel", "token", "tensor", "dynamic_token"]
DYNAMIC_TOKEN = "dynamic_token"
"""The granularity whose range is each token row's own min/max, taken at run time (nothing calibrated)."""
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


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes of ``x`` (float32, same shape) on the grid (``scale``, ``zero``), broadcastable.

    The arithmetic of ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``, which
    :class:`ActQuantizer` calls for static ranges: x * (1 / step), not x / step (the two round
    differently for about one value in 10^4), round half to even, add the zero point, clamp. So these
    are exactly the codes the simulated path dequantizes, and the ones the integer path
    (:mod:`qvlm.quant.integer`) multiplies.
    """
    inv = torch.reciprocal(scale.float())
    return torch.clamp(torch.round(x.float() * inv) + zero.float(), 0, qmax_of(bits))


def dynamic_grid(rows: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(step [M], zero point [M] as float) from each row's min/max of ``rows`` [M, K] (per-token, at run time).

    ``clip`` (a 0-d factor, or None for 1): each row's range shrunk to [clip * min, clip * max], the values beyond
    clamped to its ends (QuaRot clips per-token ranges the same way, with a fixed 0.9)."""
    rows = rows.float()
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if clip is not None:
        lo, hi = lo * clip.float(), hi * clip.float()
    return qparams(lo, hi, bits)


def fake_quant_dynamic(x: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., C] quantize-dequantized per token row on the row's own min/max grid, in ``x``'s dtype.

    The codes are :func:`act_codes` on :func:`dynamic_grid`, the integer path's dynamic mode exactly,
    so a simulated and an integer layer see the same codes. With a gradient, it passes straight
    through (the values stay the dequantized ones bit for bit: ``x - x.detach()`` adds an exact 0):
    VEO backpropagates through the LLM, and round() alone would stop every gradient there.
    """
    rows = x.detach().reshape(-1, x.shape[-1])
    scale, zero = dynamic_grid(rows, bits, clip)
    scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    x_hat = ((act_codes(rows, scale, zero, bits) - zero) * scale).reshape(x.shape).to(x.dtype)
    if x.requires_grad:
        return x_hat + (x - x.detach())
    return x_hat


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ste(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable fake quantization: STE through round, true gradient through clamp and Delta.

    Gradients reach ``lo``/``hi`` the LSQ way (through the step and the clipping), which is what
    VEO needs to learn the vision-tower bounds (paper §3.3, Eq. 10).
    """
    qmax = qmax_of(bits)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(EPS)
    zp = torch.clamp(round_ste(-lo / scale), 0, qmax)
    q = torch.clamp(round_ste(x / scale) + zp, 0, qmax)
    return (q - zp) * scale


WEIGHT_FORMATS = ("uniform", "nf4")
"""The weight formats, spelled as in ``QuantConfig.weight_format``, export manifests and the UI.
``"nf4"`` names NormalFloat at any bit-width (NF4 at 4 bits, NF3 at 3, ...)."""

NF4_BLOCK = 64
"""NormalFloat block size when none is given: bitsandbytes' ``quantize_4bit`` default (QLoRA)."""

MAX_GROUP = 4096
"""Largest weight group: bitsandbytes' largest block size; for uniform weights, per output channel
(no group size) is the way to ask for one range per row."""


def check_group_size(group_size: int | None) -> None:
    """Raise ValueError unless ``group_size`` is None or a power of two from 2 to :data:`MAX_GROUP`.

    Why powers of two: they are the block sizes bitsandbytes (NF4) and the grouped-int kernels
    (AWQ, GPTQ: 32, 64, 128) accept, so a quantized weight can move to those kernels unchanged.
    Any layer width works with any such size (see :func:`encode_uniform`, :func:`encode_normal_float`).
    """
    if group_size is None:
        return
    ok = (isinstance(group_size, int) and not isinstance(group_size, bool)
          and 2 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0)
    if not ok:
        raise ValueError(
            f"weight group size {group_size!r} is not a power of two from 2 to {MAX_GROUP} "
            "(e.g. 32, 64, 128); leave it empty for one range per output channel"
        )


def _blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """[..., L] -> [..., ceil(L / size), size]: consecutive blocks of the last dimension, the last one
    zero-padded. Zero padding moves no range: uniform ranges always contain 0 (:func:`qparams`) and
    an absmax ignores zeros; padded codes are dropped again after encoding and decoding."""
    pad = (-t.shape[-1]) % size
    if pad:
        t = F.pad(t, (0, pad))
    return t.unflatten(-1, (-1, size))


@dataclass
class EncodedWeight:
    """A quantized [out, in] weight as integer codes plus the floats that map them back (what gets stored).

    ``codes``: [out * in] uint8, row-major. The blocks differ by format, so that every layer width
    works (SigLIP-so400m's 4304-wide fc2 input is not a multiple of 64; tests/hub_configs.py):

    * ``"uniform"``: groups of ``group`` consecutive inputs *within each output row*, the last group of
      a row shorter when ``group`` does not divide ``in``. ``scale``/``zero``: [out, ceil(in / group)],
      w_hat = (codes - zero) * scale. ``group == in`` is one range per output channel. A group never
      spans two rows: AWQ's per-input-channel scales and the per-channel case stay row-local.
    * ``"nf4"`` (NormalFloat, any bits): blocks of ``group`` consecutive elements of the *flattened*
      weight, the last block shorter when ``group`` does not divide out * in; ``scale``: [n_blocks]
      absmax, ``zero`` None, w_hat = levels[codes] * absmax. This is exactly bitsandbytes'
      ``quantize_4bit(w, blocksize=group, quant_type="nf4")`` layout (same codes, same absmax, same
      dequantized floats; bitsandbytes packs the first code of a byte in the high nibble, ours in the
      low one), and for in % group == 0 it equals per-row groups.
    """

    fmt: str
    bits: int
    shape: tuple[int, int]
    group: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return decode_weight(self.fmt, self.bits, self.shape, self.group, self.codes, self.scale, self.zero).to(dtype)


def decode_weight(fmt: str, bits: int, shape: tuple[int, int], group: int, codes: torch.Tensor,
                  scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 [out, in] weight from flat codes (layouts: :class:`EncodedWeight`).

    The one place the weight dequantization arithmetic lives, shared by the fake quantizer and the
    packed layer so both compute bit-identical weights.
    """
    out_f, in_f = shape
    if fmt == "uniform":
        grouped = _blocks(codes.reshape(out_f, in_f), group)
        w = (grouped.float() - zero.float().reshape(out_f, -1, 1)) * scale.reshape(out_f, -1, 1)
        w = w.flatten(1)
        return w if w.shape[1] == in_f else w[:, :in_f].contiguous()
    if fmt != "nf4":
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    grouped = _blocks(codes.reshape(-1), group)
    w = normal_float_levels(bits).to(codes.device)[grouped.int()] * scale.reshape(-1, 1)
    return w.reshape(-1)[: out_f * in_f].reshape(out_f, in_f)


def encode_uniform(w: torch.Tensor, bits: int, group_size: int | None = None) -> EncodedWeight:
    """Asymmetric round-to-nearest codes with min/max ranges per output channel, or per group of
    ``group_size`` inputs of a row (the row's last group shorter when it does not divide the width)."""
    check_group_size(group_size)
    out_f, in_f = w.shape
    g = in_f if group_size is None else min(group_size, in_f)
    wg = _blocks(w.float(), g)
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    scale, zp = qparams(lo, hi, bits)
    codes = torch.clamp(torch.round(wg / scale) + zp, 0, qmax_of(bits)).to(torch.uint8).flatten(1)[:, :in_f]
    return EncodedWeight("uniform", bits, (out_f, in_f), g, codes.reshape(-1), scale.squeeze(-1), zp.squeeze(-1))


def quantize_weight_uniform(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest with min/max ranges per output channel (or per group of input elements)."""
    return encode_uniform(w, bits, group_size).decode(w.dtype)


# ----------------------------------------------------------------------------------------------
# NormalFloat (QLoRA)
# ----------------------------------------------------------------------------------------------
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
"""bitsandbytes' NF4 table (``bitsandbytes.functional.get_4bit_type("nf4")``, from QLoRA), verbatim:
the formula below reproduces it only to ~2e-7, and equal floats make our NF4 weights bit-identical
to bitsandbytes' dequantized ones."""


@lru_cache(maxsize=16)
def _normal_float_levels(bits: int) -> tuple[float, ...]:
    if bits == 4:
        return NF4_LEVELS
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
    """The 2^b NormalFloat levels in [-1, 1], sorted (b=4: bitsandbytes' NF4 table, :data:`NF4_LEVELS`)."""
    return torch.tensor(_normal_float_levels(bits), dtype=torch.float32)


BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes ``bitsandbytes.functional.quantize_4bit`` accepts on the CPU (0.50: 2-16 raise)."""


def encode_normal_float(w: torch.Tensor, bits: int = 4, block_size: int | None = NF4_BLOCK) -> EncodedWeight:
    """Blockwise absmax NormalFloat level indices (QLoRA, no double quantization).

    At 4 bits with a block size bitsandbytes takes (:data:`BNB_BLOCKS`) the codes come from
    ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")`` itself
    (:func:`encode_nf4_bitsandbytes`); other bit-widths and block sizes use
    :func:`encode_normal_float_blocks`, the same arithmetic written out (tests check that both give
    identical codes and absmax, every width included).
    """
    check_group_size(block_size)
    g = block_size or NF4_BLOCK
    if bits == 4 and g in BNB_BLOCKS:
        return encode_nf4_bitsandbytes(w, g)
    return encode_normal_float_blocks(w, bits, block_size)


def encode_nf4_bitsandbytes(w: torch.Tensor, block_size: int = NF4_BLOCK) -> EncodedWeight:
    """NF4 codes and absmax of ``w`` [out, in] from ``bitsandbytes.functional.quantize_4bit``.

    bitsandbytes quantizes the flattened weight in blocks of ``block_size`` (the last one shorter),
    which is :class:`EncodedWeight`'s layout for any width; its bytes hold the first code in the
    high nibble, unpacked here to one code per element.
    """
    from bitsandbytes.functional import quantize_4bit

    out_f, in_f = w.shape
    packed, state = quantize_4bit(w.detach().float().contiguous(), blocksize=block_size, quant_type="nf4")
    g = min(block_size, out_f * in_f)  # one block holds a small weight whole: same group as the written-out path
    return EncodedWeight("nf4", 4, (out_f, in_f), g, nibbles_to_codes(packed, out_f * in_f),
                         state.absmax.float())


def nibbles_to_codes(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[count] uint8 codes from bitsandbytes' 4-bit bytes (first code of a byte in the high nibble)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:count].contiguous()


def encode_normal_float_blocks(w: torch.Tensor, bits: int = 4, block_size: int | None = NF4_BLOCK) -> EncodedWeight:
    """NormalFloat codes with bitsandbytes' arithmetic written out, for any bit-width and block size.

    Blocks of ``block_size`` consecutive elements of the flattened weight, the last one shorter;
    x * (1 / absmax), clamped to [-1, 1], nearest level by midpoints (``quantize_4bit``'s steps).
    """
    check_group_size(block_size)
    out_f, in_f = w.shape
    g = min(block_size or NF4_BLOCK, out_f * in_f)
    blocks = _blocks(w.float().reshape(-1), g)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1.0, 1.0)
    levels = normal_float_levels(bits).to(w.device)
    idx = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)
    codes = idx.to(torch.uint8).reshape(-1)[: out_f * in_f]
    return EncodedWeight("nf4", bits, (out_f, in_f), g, codes, absmax)


def encode_weight(w: torch.Tensor, bits: int, fmt: str, group_size: int | None) -> EncodedWeight:
    """Codes of ``w`` in ``fmt`` (:data:`WEIGHT_FORMATS`); ``group_size`` None is per output channel
    (uniform) or :data:`NF4_BLOCK` (NormalFloat). Any width works; bad sizes raise ValueError."""
    if fmt == "nf4":
        return encode_normal_float(w, bits, group_size)
    if fmt == "uniform":
        return encode_uniform(w, bits, group_size)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")


def quantize_weight(w: torch.Tensor, bits: int, fmt: str, group_size: int | None) -> torch.Tensor:
    return encode_weight(w, bits, fmt, group_size).decode(w.dtype)


# ----------------------------------------------------------------------------------------------
# activation quantizer
# ----------------------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Fake quantizer of a Linear's input: static ranges, or dynamic ones per token row.

    Static ranges are per input channel ("channel", LLM), per token position ("token", vision tower:
    the sequence length is fixed there) or one per tensor. During calibration it can *observe*
    its inputs (kept by reference, one per batch) while still quantizing with its current ranges,
    or pass them through untouched if it has none yet. In VEO it becomes *learnable*: the
    log-magnitudes of its bounds are parameters and the forward is differentiable (STE).

    "dynamic_token" (:data:`DYNAMIC_TOKEN`) has no stored range: every token row is quantized on its
    own min/max at run time (:func:`fake_quant_dynamic`), so it is never ``calibrated``; it quantizes
    from the start. It may hold one ``clip`` factor (:meth:`set_clip`): each row's range shrunk by it,
    the one setting of a dynamic range that the init can choose and VEO can train (as log clip).

    ``rotation`` (None, or an orthogonal [C, C] Q): the input is rotated first, x -> x Q (Q^T x per
    token), and the ranges are those of the rotated input; the Linear's weight holds W Q, so
    (W Q)(Q^T x) = W x (QuaRot, arXiv 2404.00456; :mod:`qvlm.quant.vision_ranges`). The rotation lives
    here, with the ranges it defines, so every layer that calls the quantizer (fake-quant, packed,
    exported) applies it, also while quantizing is disabled.
    """

    def __init__(self, bits: int, granularity: Granularity) -> None:
        super().__init__()
        self.bits = bits
        self.granularity = granularity
        self.register_buffer("lo", None)
        self.register_buffer("hi", None)
        self.register_buffer("_scale", None, persistent=False)
        self.register_buffer("_zp", None, persistent=False)
        self.register_buffer("rotation", None)
        self.register_buffer("clip", None)
        self.enabled = True
        self.observing = False
        self.records: list[torch.Tensor] = []
        self.log_neg_lo: nn.Parameter | None = None
        self.log_hi: nn.Parameter | None = None
        self.log_clip: nn.Parameter | None = None

    # --- ranges -------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Whether it holds static ranges (a dynamic quantizer never does, and needs none)."""
        return self.lo is not None

    @property
    def dynamic(self) -> bool:
        return self.granularity == DYNAMIC_TOKEN

    @property
    def trainable(self) -> bool:
        """Whether it holds something to train: static ranges, or a dynamic range's clip factor."""
        return self.calibrated or (self.dynamic and self.clip is not None)

    def set_clip(self, factor: float | torch.Tensor) -> None:
        """Shrink every row's dynamic range by ``factor`` (0 < factor; 1 = each row's own min/max)."""
        if not self.dynamic:
            raise RuntimeError("only a dynamic_token quantizer takes a clip factor; a static one has ranges")
        self.clip = torch.as_tensor(factor, dtype=torch.float32).detach().reshape(()).clone()

    def get_clip(self) -> torch.Tensor | None:
        """The clip factor (trained, while VEO trains it); None: each row's own min/max."""
        return torch.exp(self.log_clip) if self.log_clip is not None else self.clip

    def set_rotation(self, q: torch.Tensor) -> None:
        """Rotate every input by the orthogonal ``q`` [C, C] before quantizing (x -> x Q); see the class.

        ``q`` is held, not copied: one rotation per input width serves every layer of that width, and a copy per
        layer was 5.5 MB of the easy-VQA W4A4 variant's 26 MB in memory (its FP16 model: 9 MB). Never changed in
        place."""
        self.rotation = q.detach().float()

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
        """Turn the current bounds into trainable log-magnitudes (lo = -exp(a), hi = exp(b)); a dynamic quantizer's
        clip factor into log clip."""
        if self.dynamic:
            if self.clip is None:
                raise RuntimeError("a dynamic_token quantizer without a clip factor has nothing to learn: its ranges "
                                   "are taken at run time")
            self.log_clip = nn.Parameter(torch.log(self.clip.clamp_min(EPS)))
            return [self.log_clip]
        if not self.calibrated:
            raise RuntimeError("cannot learn the bounds of an uncalibrated quantizer")
        span = (self.hi - self.lo).clamp_min(EPS)
        self.log_neg_lo = nn.Parameter(torch.log(torch.clamp(-self.lo, min=1e-3 * span)))
        self.log_hi = nn.Parameter(torch.log(torch.clamp(self.hi, min=1e-3 * span)))
        return [self.log_neg_lo, self.log_hi]

    def freeze(self) -> None:
        """Write learned bounds (or clip factor) back as static values and drop the parameters."""
        if self.log_clip is not None:
            clip = torch.exp(self.log_clip.detach())
            self.log_clip = None
            self.set_clip(clip)
            return
        if self.log_hi is None:
            return
        lo, hi = self.get_range()
        self.log_neg_lo = None
        self.log_hi = None
        self.set_range(lo.detach(), hi.detach())

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = x @ self.rotation.to(x.device, x.dtype)
        if self.observing:
            self.records.append(x.detach())
        if not self.enabled:
            return x
        if self.dynamic:
            if self.log_clip is not None:  # VEO: the gradient reaches the factor through each row's step (LSQ-style)
                rows = x.detach()
                clip = torch.exp(self.log_clip)
                lo, hi = rows.amin(-1, keepdim=True).float() * clip, rows.amax(-1, keepdim=True).float() * clip
                return fake_quant_ste(x, lo, hi, self.bits).to(x.dtype)
            return fake_quant_dynamic(x, self.bits, self.clip)
        if not self.calibrated:
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
        if x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            return self._answering_fake_quant(x, axis)
        return torch.fake_quantize_per_channel_affine(
            x, self._scale.to(x.device), self._zp.to(x.device), axis, 0, qmax_of(self.bits)
        )

    def _answering_fake_quant(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """``torch.fake_quantize_per_channel_affine``'s result bit for bit, in five in-place passes.

        Why: that op always builds the mask its backward needs and walks the channel axis per element; on
        a 2-core AVX2 CPU it took 30% of a W4A4 model's answering time (1.1 ms per call on [32, 80, 192],
        this 0.13 ms). Same arithmetic: x * (1 / step) (float32), round half to even, + zero point, clamp,
        - zero point, * step; ``tests/quant/test_quantizers.py`` checks equality, ties included.
        """
        shape = [1] * x.dim()
        shape[axis] = self._scale.numel()
        scale = self._scale.to(x.device).view(shape)
        zero = self._zp.to(x.device, torch.float32).view(shape)
        inverse = torch.reciprocal(scale)
        return torch.mul(x, inverse).round_().add_(zero).clamp_(0, qmax_of(self.bits)).sub_(zero).mul_(scale)

    def extra_repr(self) -> str:
        rotated = "" if self.rotation is None else ", rotated"
        return f"bits={self.bits}, granularity={self.granularity}, calibrated={self.calibrated}{rotated}"


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


def dynamic_clip_search(rows: torch.Tensor, bits: int, grid: tuple[float, ...], p: float) -> float:
    """The factor of ``grid`` whose clipped per-row ranges (:func:`dynamic_grid`) give ``rows`` [N, C] the smallest
    mean |Q(x) - x|^p: the lp clipping of :func:`lp_clip_search`, for ranges taken per token at run time."""
    best, best_err = 1.0, math.inf
    for c in grid:
        err = float((fake_quant_dynamic(rows, bits, torch.tensor(float(c))) - rows).float().abs().pow(p).mean())
        if err < best_err:
            best, best_err = float(c), err
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
