"""AWQ's activation-aware weight scaling (Lin et al., 2024), as the paper's "AWQ" baseline.

For the Linears that share one input x (q/k/v, gate/up, ...), search alpha in [0, 1) for the
per-input-channel scale s = mean|x|^alpha (normalised so sqrt(max*min) = 1) that minimises the
weight-quantization error of the outputs, || Q(W diag(s)) (x / s) - W x ||^2, exactly AWQ's
weight-only objective. The division by s is kept on the input (in a real kernel it is folded
into the preceding norm), so the activation quantizer then sees the smoothed x / s.

The weights are quantized with the run's format and group (the ``awq`` recipe: uniform groups of
64), through :func:`~qvlm.quant.quantizers.quantize_weight`, so the search scores exactly the weight
that is then stored; any layer width works (a row's last group is shorter where 64 does not divide it).
"""

from __future__ import annotations

import torch

from qvlm.quant.quantizers import quantize_weight


@torch.no_grad()
def awq_scale_search(x: torch.Tensor, weights: list[torch.Tensor], bits: int, fmt: str,
                     group_size: int | None, grid: int) -> tuple[torch.Tensor, float]:
    """Best scale s ([C]) and its alpha, for inputs ``x`` ([N, C]) shared by ``weights`` ([out, C])."""
    x = x.float()
    x_mean = x.abs().mean(dim=0).clamp_min(1e-6)
    refs = [x @ w.float().t() for w in weights]
    best_err, best_s, best_alpha = float("inf"), torch.ones_like(x_mean), 0.0
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        err = 0.0
        for w, ref in zip(weights, refs):
            wq = quantize_weight(w.float() * s, bits, fmt, group_size)
            err += float((xs @ wq.t() - ref).pow(2).mean())
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha
