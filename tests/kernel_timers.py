"""Injected kernel timings: the choice logic of qvlm/quant/kernels.py tested with set speeds, never timed ones."""

from __future__ import annotations

import torch
from torch import nn

from qvlm.quant.integer import IntegerLinear
from qvlm.quant.kernels import ACCUMULATORS
from qvlm.quant.packing import PackedLinear


def fixed_timer(seconds: dict[str, float]):
    """A timer that says ``seconds[backend]`` per row for the module's backend ("fp": the FP nn.Linear)."""
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        if isinstance(module, IntegerLinear):
            key = module.accumulator
        elif isinstance(module, PackedLinear):
            key = "float" if module.dequantized is not None else "simulated"
        else:
            key = "fp"
        return seconds[key] * (x.numel() // x.shape[-1])
    return timer


def speeds(fp: float = 1.0, float_: float = 1.1, simulated: float = 2.0, **integer: float) -> dict[str, float]:
    return {"fp": fp, "float": float_, "simulated": simulated, **{n: integer.get(n.replace("-", "_"), 50.0)
                                                                   for n in ACCUMULATORS}}
