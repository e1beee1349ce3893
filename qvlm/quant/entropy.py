"""Cross-layer dependency D(k, k+1): conditional entropy of soft-quantized activations (Eqs. 4, 5).

Eq. 5 (soft level assignment of element x to the M = 2^b rounding points q_m of its channel):

    r(x)[m] = softmax_m( -((x - q_m) / Delta)^2 / tau )    ("scaled", recommended: scale-invariant)
    r(x)[m] = softmax_m( -(x - q_m)^2 / Delta )            ("literal", as printed in the paper)

Eq. 4, which does not say over what the probabilities are taken, read as: pool the elements ij of one sample,

    P(m, m') = mean_ij r_k(x_ij)[m] * r_{k+1}(x_ij)[m'],  P(m) = sum_m' P(m, m'),
    D(k, k+1) = - sum_{m,m'} P(m, m') log( P(m, m') / P(m) ),

i.e. H(level at layer k+1 | level at layer k). Everything is differentiable in x (VEO needs
that); grids (Delta, zero point) are constants. For M <= 32 the M x M joint is one batched
matmul; for more levels only the 2K+1 nearest levels get mass (weights below 1e-5 dropped) and
the joint is accumulated with ``index_add`` so 8-bit grids stay affordable (K = 3 for tau = 1).
"""

from __future__ import annotations

import math

import torch

from qvlm.quant.quantizers import minmax_ranges, qparams, valid_rows

DENSE_MAX_LEVELS = 32


def residual_grid(xs: list[torch.Tensor], masks: list[torch.Tensor | None], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero point) per channel of a layer's residual-stream input: the "residual" entropy
    site's grid, from its min/max over the real tokens of every batch."""
    rows = torch.cat([valid_rows(x, m) for x, m in zip(xs, masks)])
    return qparams(*minmax_ranges(rows), bits)


def _logits(d: torch.Tensor, scale: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    """``d`` = (x - q_m) / Delta (in steps)."""
    if mode == "literal":
        return -(d * d) * scale  # (x-q)^2 / Delta = d^2 Delta^2 / Delta
    return -(d * d) / tau


def soft_assign(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, tau: float = 1.0,
                mode: str = "scaled") -> torch.Tensor:
    """Dense Eq. 5: r with shape x.shape + [M]; ``scale``/``zp`` broadcast against x."""
    m = 1 << bits
    u = x.float() / scale + zp  # position on the level axis: level m sits at u = m
    levels = torch.arange(m, device=x.device, dtype=torch.float32)
    d = u.unsqueeze(-1) - levels
    return torch.softmax(_logits(d, scale.unsqueeze(-1) if scale.dim() else scale, tau, mode), dim=-1)


def band_width(tau: float, mode: str, max_scale: float) -> int:
    """Half-width K (levels) of the band: a level K + 1/2 steps away or more has a kernel weight below
    1e-5 of the nearest level's (exp(-11.5)), negligible for the joint table."""
    cut = 11.5
    if mode == "literal":
        per_step = max(max_scale, 1e-12)  # exp(-d^2 * Delta)
        return max(1, int(math.ceil(math.sqrt(cut / per_step) - 0.5)))
    return max(1, int(math.ceil(math.sqrt(cut * tau) - 0.5)))


def soft_assign_banded(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, half_width: int,
                       tau: float = 1.0, mode: str = "scaled") -> tuple[torch.Tensor, torch.Tensor]:
    """(level indices, weights), each x.shape + [2K+1]: Eq. 5 restricted to the nearest levels."""
    qmax = (1 << bits) - 1
    u = x.float() / scale + zp
    center = torch.round(u).clamp(0, qmax)
    offsets = torch.arange(-half_width, half_width + 1, device=x.device, dtype=torch.float32)
    idx = center.unsqueeze(-1) + offsets
    valid = (idx >= 0) & (idx <= qmax)
    d = u.unsqueeze(-1) - idx
    logits = _logits(d, scale.unsqueeze(-1) if scale.dim() else scale, tau, mode)
    logits = logits.masked_fill(~valid, float("-inf"))
    w = torch.softmax(logits, dim=-1)
    return idx.clamp(0, qmax).long(), w


def conditional_entropy(joint: torch.Tensor) -> torch.Tensor:
    """H(B | A) for joint tables [..., M, M'] whose rows index A (normalised inside)."""
    p = joint / joint.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    row = p.sum(dim=-1, keepdim=True)
    # p * log(p / row) with 0 log 0 = 0; clamping (not xlogy) keeps the gradient finite at p = 0
    tiny = 1e-30
    return -(p * (torch.log(p.clamp_min(tiny)) - torch.log(row.clamp_min(tiny)))).sum(dim=(-2, -1))


def pair_joint(xk: torch.Tensor, xk1: torch.Tensor, grid_k: tuple[torch.Tensor, torch.Tensor],
               grid_k1: tuple[torch.Tensor, torch.Tensor], bits: int, mask: torch.Tensor | None,
               tau: float = 1.0, mode: str = "scaled") -> torch.Tensor:
    """Per-sample joint level tables [B, M, M] for activations ``xk``, ``xk1`` of shape [B, T, C]."""
    m = 1 << bits
    b = xk.shape[0]
    w = torch.ones(xk.shape[:2], device=xk.device) if mask is None else mask.float()
    if m <= DENSE_MAX_LEVELS:
        rk = soft_assign(xk, *grid_k, bits, tau, mode) * w[..., None, None]
        rk1 = soft_assign(xk1, *grid_k1, bits, tau, mode)
        return torch.einsum("bnm,bnp->bmp", rk.reshape(b, -1, m), rk1.reshape(b, -1, m))
    max_scale = float(max(grid_k[0].max(), grid_k1[0].max()))
    k = band_width(tau, mode, max_scale)
    ik, wk = soft_assign_banded(xk, *grid_k, bits, k, tau, mode)
    ik1, wk1 = soft_assign_banded(xk1, *grid_k1, bits, k, tau, mode)
    wk = wk * w[..., None, None]
    kk = 2 * k + 1
    flat_idx = (ik.reshape(b, -1, kk, 1) * m + ik1.reshape(b, -1, 1, kk)).reshape(b, -1)
    flat_w = (wk.reshape(b, -1, kk, 1) * wk1.reshape(b, -1, 1, kk)).reshape(b, -1)
    offsets = (torch.arange(b, device=xk.device) * m * m).unsqueeze(-1)
    out = torch.zeros(b * m * m, device=xk.device, dtype=flat_w.dtype)
    out = out.index_add(0, (flat_idx + offsets).reshape(-1), flat_w.reshape(-1))
    return out.reshape(b, m, m)


def pair_entropy(xk: torch.Tensor, xk1: torch.Tensor, grid_k: tuple[torch.Tensor, torch.Tensor],
                 grid_k1: tuple[torch.Tensor, torch.Tensor], bits: int, mask: torch.Tensor | None,
                 tau: float = 1.0, mode: str = "scaled") -> torch.Tensor:
    """D(k, k+1) per sample ([B]), in nats."""
    return conditional_entropy(pair_joint(xk, xk1, grid_k, grid_k1, bits, mask, tau, mode))
