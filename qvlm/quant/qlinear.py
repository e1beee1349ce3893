"""QuantLinear: an ``nn.Linear`` with fake-quantized weights and a fake-quantized input.

It *is* an ``nn.Linear`` (subclass, same ``weight``/``bias`` parameters), so the layer map,
``generate`` and every other consumer keep working on a quantized model. The weight is
quantized once, in place, on the model copy; the input passes through an optional AWQ
smoothing division (the inverse of the per-channel scale folded into the weight) and then the
:class:`ActQuantizer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.quant.quantizers import ActQuantizer, EncodedWeight, encode_weight


class QuantLinear(nn.Linear):
    """Fake-quant Linear. Build with :meth:`wrap`, which reuses the wrapped layer's tensors."""

    act: ActQuantizer | None
    smooth: torch.Tensor | None

    @classmethod
    def wrap(cls, linear: nn.Linear, act: ActQuantizer | None, *, tower: str = "", role: str = "") -> "QuantLinear":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features = linear.in_features
        q.out_features = linear.out_features
        q.weight = linear.weight
        q.bias = linear.bias
        q.act = act
        q.register_buffer("smooth", None)
        q.tower = tower
        q.role = role
        q.w_bits: int | None = None
        q.w_format: str | None = None
        q.w_group: int | None = None
        q.encoded: EncodedWeight | None = None
        return q

    @property
    def weight_quantized(self) -> bool:
        return self.w_bits is not None

    @torch.no_grad()
    def quantize_weight_(self, bits: int, fmt: str, group_size: int | None,
                         smooth: torch.Tensor | None = None) -> None:
        """Quantize the (FP) weight in place; with ``smooth`` s, store Q(W diag(s)) and divide inputs by s.

        ``fmt``/``group_size`` as :func:`~qvlm.quant.quantizers.encode_weight`: any layer width works,
        a group size that is not a power of two from 2 to 4096 raises ValueError.
        """
        if self.weight_quantized:
            raise RuntimeError("weight already quantized")
        w = self.weight.data
        if smooth is not None:
            self.smooth = smooth.detach().to(w.device, torch.float32)
            w = w * self.smooth.to(w.dtype)
        self.encoded = encode_weight(w, bits, fmt, group_size)
        self.weight.data = self.encoded.decode(w.dtype)
        self.w_bits, self.w_format, self.w_group = bits, fmt, group_size

    @torch.no_grad()
    def requantize_weight_(self, w: torch.Tensor) -> None:
        """Replace the quantized weight by Q(``w``) in the format, bits and group it was quantized with.

        For a rewrite that changes the FP weight after the init (the fold of per-channel ranges,
        :mod:`qvlm.quant.vision_ranges`); ``w`` is the new FP weight [out, in], AWQ smoothing included.
        """
        if not self.weight_quantized:
            raise RuntimeError("weight not quantized yet: use quantize_weight_")
        self.encoded = encode_weight(w, self.w_bits, self.w_format, self.w_group)
        self.weight.data = self.encoded.decode(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = f"W{self.w_bits}:{self.w_format}" if self.weight_quantized else "W:fp"
        return f"{self.in_features}->{self.out_features}, {w}, tower={self.tower}, role={self.role}"


def replace_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
