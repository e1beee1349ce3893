"""Real low-bit weight storage: integer codes packed into bytes, and a Linear that computes from them.

Why our own format for uniform weights: the paper's weight quantizers are *asymmetric uniform*
per output channel (or group) at any bit-width 2-8, and bitsandbytes stores symmetric int8 or
NF4/FP4 blocks only, so a bnb layer would compute a different weight than the one that was
calibrated and searched. Here a weight is held as b-bit codes packed into a ``uint8`` stream
plus one (step, zero point) per channel/group, or (for NormalFloat) level indices plus one absmax
per block; :class:`PackedLinear` dequantizes it on the fly, with exactly the arithmetic of the
fake quantizer, so a packed model answers bit-for-bit like the fake-quant one.

NF4 (4-bit NormalFloat) is the one format bitsandbytes holds as it is: in memory its bytes are
bitsandbytes' (first code in the high nibble) and ``bitsandbytes.functional.dequantize_4bit``'s
CPU kernel decodes them in one pass (bit-identical floats, see :meth:`PackedLinear.dequantized_weight`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.quant.qlinear import QuantLinear, replace_module
from qvlm.quant.quantizers import (
    BNB_BLOCKS,
    NF4_BLOCK,
    WEIGHT_FORMATS,
    ActQuantizer,
    EncodedWeight,
    decode_weight,
    nibbles_to_codes,
)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (< 2**bits) into a flat little-endian ``uint8`` bit stream.

    Code ``i`` occupies stream bits ``i*bits .. i*bits+bits-1``; the stream is
    ``ceil(n*bits/8)`` bytes. For widths that do not divide 8 (3, 5, 6, 7), eight codes fill
    exactly ``bits`` bytes, so each run of eight is assembled in one int64 word and split into
    bytes: no per-bit tensor, which kept a LLaVA-7B layer at W6 at 37 s on a CPU.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8)
    count = flat.numel()
    per_word = 8 // bits if 8 % bits == 0 else 8  # codes per word; the word is 8 or 8*bits bits long
    word_bytes = per_word * bits // 8
    flat = F.pad(flat.to(torch.int64), (0, (-count) % per_word)).view(-1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=flat.device) * bits
    words = (flat << shifts).sum(dim=1)
    byte_shifts = torch.arange(word_bytes, dtype=torch.int64, device=flat.device) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: (count * bits + 7) // 8]


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """4-bit bytes with their two nibbles swapped: our stream (first code low) <-> bitsandbytes' (first code high)."""
    return (packed << 4) | (packed >> 4)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as ``int32``."""
    if bits == 8:
        return packed[:count].to(torch.int32)
    if 8 % bits == 0:
        # 1, 2, 4 bits: whole codes per byte, split with uint8 shifts (a 7B MLP matrix at W4: ~0.1 s
        # instead of ~0.8 s through int64 words, and this runs in every forward of a packed layer)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count].to(torch.int32)
    per_word = 8
    word_bytes = per_word * bits // 8
    data = packed.to(torch.int64)
    data = F.pad(data, (0, (-data.numel()) % word_bytes)).view(-1, word_bytes)
    byte_shifts = torch.arange(word_bytes, dtype=torch.int64, device=data.device) * 8
    words = (data << byte_shifts).sum(dim=1)
    shifts = torch.arange(per_word, dtype=torch.int64, device=data.device) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.int32)


@lru_cache(maxsize=8)
def nf4_code(device: torch.device) -> torch.Tensor:
    """bitsandbytes' NF4 table on ``device`` (its ``QuantState`` carries it), built once per device."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device)


class PackedLinear(nn.Module):
    """A Linear whose weight lives as packed b-bit codes; it dequantizes in each forward.

    Holds the same input path as the fake-quant layer it replaces (AWQ smoothing, then the
    static activation quantizer), so outputs are identical; only the weight storage changes.
    Build it with :meth:`from_encoded` (after quantizing) or the constructor (an export's stored
    tensors, ``packed`` in :func:`pack_bits`' stream layout). Buffers: ``packed`` (the code stream;
    NF4 keeps it in bitsandbytes' byte order, :meth:`code_stream` gives the stream back), ``scale`` ([out, n_groups] float32 steps for
    uniform weights, [n_blocks] float32 absmax for NormalFloat), ``zero`` ([out, n_groups] uint8, or
    None), ``smooth`` (AWQ, or None); the group layouts are :class:`EncodedWeight`'s.
    """

    def __init__(self, packed: torch.Tensor, fmt: str, bits: int, shape: tuple[int, int], group: int,
                 scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                 act: ActQuantizer | None, smooth: torch.Tensor | None, dtype: torch.dtype,
                 tower: str = "", role: str = "") -> None:
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")
        self.out_features, self.in_features = shape
        self.fmt, self.bits, self.group = fmt, bits, group
        self.compute_dtype = dtype
        self.tower, self.role = tower, role
        self.bnb_nf4 = fmt == "nf4" and bits == 4
        self.register_buffer("packed", swap_nibbles(packed) if self.bnb_nf4 else packed)
        scale = scale.float()
        self.register_buffer("scale", scale.reshape(self.out_features, -1) if fmt == "uniform" else scale.reshape(-1))
        self.register_buffer("zero", None if zero is None else zero.to(torch.uint8).reshape(self.out_features, -1))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act
        self.register_buffer("dequantized", None, persistent=False)

    def hold_dequantized(self, on: bool = True) -> None:
        """Keep the dequantized weight from now on (``on``), or drop it and decode in every call again.

        Why a choice: decoding costs a pass over the weight in every forward (NF4 through bitsandbytes' kernel,
        uniform codes through shifts), which made a W4A4 model answer slower than its FP model; held, the
        layer computes the same floats at float32 GEMM speed, for the memory of an FP weight. Which one a
        layer runs is measured (:mod:`qvlm.quant.kernels`). Not saved: exports read the packed codes.
        """
        self.dequantized = self.dequantized_weight().detach() if on else None

    @classmethod
    def from_encoded(cls, encoded: EncodedWeight, bias: torch.Tensor | None, act: ActQuantizer | None,
                     smooth: torch.Tensor | None, dtype: torch.dtype, tower: str = "", role: str = "") -> "PackedLinear":
        """The packed form of ``encoded`` (codes packed to ``bits`` bits each) with this input path."""
        return cls(pack_bits(encoded.codes, encoded.bits), encoded.fmt, encoded.bits, encoded.shape, encoded.group,
                   encoded.scale, encoded.zero, bias, act, smooth, dtype, tower, role)

    weight_quantized = True  # same question a fake-quant QuantLinear answers

    @property
    def w_bits(self) -> int:
        return self.bits

    @property
    def w_format(self) -> str:
        """The weight format, spelled as in QuantConfig ("uniform" or "nf4")."""
        return self.fmt

    @property
    def w_group(self) -> int:
        return self.group

    def code_stream(self) -> torch.Tensor:
        """The codes as :func:`pack_bits` lays them out (what an export stores)."""
        return swap_nibbles(self.packed) if self.bnb_nf4 else self.packed

    def dequantized_weight(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype, bit-identical to the fake quantizer's.

        NF4 goes through ``bitsandbytes.functional.dequantize_4bit`` (one pass in C instead of
        unpacking, gathering and scaling in Python: ~10x less time per forward) when the block size
        divides the width. Why only then: bitsandbytes 0.50.2's CPU kernel walks the blocks
        *within each row* (``backends/cpu/ops.py``), while ``quantize_4bit`` blocks the flattened
        weight, so for other widths (SigLIP's 4304 at 64) it decodes wrong floats; those layers, and
        NormalFloat at other bit-widths, decode with :func:`decode_weight`.
        """
        shape = (self.out_features, self.in_features)
        if self.bnb_nf4 and self.in_features % self.group == 0 and self.group in BNB_BLOCKS:
            from bitsandbytes.functional import QuantState, dequantize_4bit

            state = QuantState(absmax=self.scale, shape=torch.Size(shape), code=nf4_code(self.scale.device),
                               blocksize=self.group, quant_type="nf4", dtype=self.compute_dtype)
            return dequantize_4bit(self.packed, state)
        count = shape[0] * shape[1]
        codes = nibbles_to_codes(self.packed, count) if self.bnb_nf4 else unpack_bits(self.packed, self.bits, count)
        w = decode_weight(self.fmt, self.bits, shape, self.group, codes, self.scale, self.zero)
        return w.to(self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` (shape/dtype/device checks)."""
        return self.dequantized if self.dequantized is not None else self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act is not None:
            x = self.act(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedMatmul.apply(x, self)
        weight = self.dequantized if self.dequantized is not None else self.dequantized_weight()
        return F.linear(x, weight, self.bias)

    def storage_bytes(self) -> int:
        """Bytes this layer really holds for its weight (codes + scales + zero points)."""
        tensors = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, W{self.bits}:{self.fmt} packed "
                f"({self.storage_bytes()} bytes), tower={self.tower}, role={self.role}")


def packed_weight_bytes(shape: tuple[int, int], bits: int, fmt: str, group: int | None) -> int:
    """Bytes :class:`PackedLinear` holds for an [out, in] weight stored as ``fmt`` with ``group``
    (None: per output channel for uniform, :data:`NF4_BLOCK` for NormalFloat), without building it:
    the code stream, a float32 step (uniform) or absmax (NormalFloat) per group, a uint8 zero point
    per uniform group. Groups follow :class:`EncodedWeight` (the last one of a row or of the
    flattened weight may be shorter)."""
    out_f, in_f = shape
    codes = (out_f * in_f * bits + 7) // 8
    if fmt == "nf4":
        return codes + 4 * -(-(out_f * in_f) // (group or NF4_BLOCK))
    groups = out_f * -(-in_f // (group or in_f))
    return codes + 5 * groups


class _PackedMatmul(torch.autograd.Function):
    """``x @ W^T + b`` for a packed layer when a gradient must reach ``x`` (VEO's backward).

    Why not ``F.linear``: autograd would save the dequantized weight of every layer for the
    backward pass, i.e. hold the whole LLM decoded again (LLaVA-7B: 13 GB) while VEO backpropagates
    through it. Here only the packed codes are kept; the weight is dequantized again in backward.
    Weights and bias are frozen, so only the input's gradient is computed (and ``x`` is not saved).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "PackedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(), layer.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantized_weight().to(grad_out.dtype), None


def pack_model(model: nn.Module) -> dict[str, int]:
    """Replace every weight-quantized :class:`QuantLinear` by a :class:`PackedLinear`, in place.

    Returns {"layers": n, "packed_bytes": b}. The forward pass is unchanged bit-for-bit.
    """
    count, total = 0, 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and module.weight_quantized and module.encoded is not None:
            packed = PackedLinear.from_encoded(module.encoded, module.bias, module.act, module.smooth,
                                               module.weight.dtype, module.tower, module.role)
            packed.to(module.weight.device)
            replace_module(model, name, packed)
            # Drop the decoded weight now: the Parameter object may still be reachable from elsewhere
            # (the Linear it was wrapped from, a layer map), and would keep a full-size copy alive.
            module.weight.data = module.weight.data.new_empty(0)
            module.encoded = None
            count += 1
            total += packed.storage_bytes()
    return {"layers": count, "packed_bytes": total}
