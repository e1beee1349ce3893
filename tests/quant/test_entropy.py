"""Eq. 5 soft assignment and Eq. 4 conditional entropy on cases small enough to do by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qvlm.quant.entropy import conditional_entropy, pair_entropy, pair_joint, soft_assign, soft_assign_banded


def _grid(lo: float, hi: float, bits: int, channels: int = 1):
    from qvlm.quant.quantizers import qparams

    scale, zp = qparams(torch.full((channels,), lo), torch.full((channels,), hi), bits)
    return scale, zp


def test_eq5_scaled_by_hand():
    scale, zp = _grid(0.0, 3.0, 2)  # levels 0, 1, 2, 3 (step 1)
    r = soft_assign(torch.tensor([[[1.5]]]), scale, zp, 2, tau=1.0).flatten()
    a, b = math.exp(-2.25), math.exp(-0.25)
    expected = torch.tensor([a, b, b, a]) / (2 * a + 2 * b)
    assert torch.allclose(r, expected, atol=1e-6)


def test_eq5_literal_differs_and_matches_the_printed_formula():
    scale, zp = _grid(0.0, 6.0, 2)  # levels 0, 2, 4, 6 (step 2)
    x = torch.tensor([[[3.0]]])
    literal = soft_assign(x, scale, zp, 2, mode="literal").flatten()
    a, b = math.exp(-(3.0**2) / 2), math.exp(-(1.0**2) / 2)  # exp(-(x - q)^2 / Delta)
    assert torch.allclose(literal, torch.tensor([a, b, b, a]) / (2 * a + 2 * b), atol=1e-6)
    scaled = soft_assign(x, scale, zp, 2, tau=1.0).flatten()  # exp(-((x - q)/Delta)^2): scale-free
    a2, b2 = math.exp(-2.25), math.exp(-0.25)
    assert torch.allclose(scaled, torch.tensor([a2, b2, b2, a2]) / (2 * a2 + 2 * b2), atol=1e-6)


def test_eq4_single_element_equals_entropy_of_the_second_assignment():
    # one element: x_k halfway between the two levels -> r_k = (1/2, 1/2); x_k1 on level 0 with tau=1
    # -> r_k1 = (p, 1-p), p = 1 / (1 + e^-1). The joint is r_k r_k1^T, so H(B|A) = H(p).
    scale, zp = _grid(0.0, 1.0, 1)
    d = pair_entropy(torch.tensor([[[0.5]]]), torch.tensor([[[0.0]]]), (scale, zp), (scale, zp), 1, None, tau=1.0)
    p = 1 / (1 + math.exp(-1))
    assert float(d[0]) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), abs=1e-6)


def test_eq4_hard_limit_deterministic_is_zero_independent_is_log2():
    scale, zp = _grid(0.0, 3.0, 2)
    tau = 1e-3  # almost hard rounding
    xk = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]).view(1, 8, 1)
    same = pair_entropy(xk, 3.0 - xk, (scale, zp), (scale, zp), 2, None, tau=tau)  # a bijection of the level
    assert float(same[0]) == pytest.approx(0.0, abs=1e-6)
    a = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 4, 1)
    b = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1)
    indep = pair_entropy(a, b, (scale, zp), (scale, zp), 2, None, tau=tau)
    assert float(indep[0]) == pytest.approx(math.log(2), abs=1e-6)


def test_conditional_entropy_of_a_table():
    joint = torch.tensor([[0.25, 0.25], [0.5, 0.0]])
    # H(B|A) = P(A=0) H(1/2,1/2) + P(A=1) H(1,0) = 0.5 log 2
    assert float(conditional_entropy(joint)) == pytest.approx(0.5 * math.log(2), abs=1e-7)


def test_padding_is_ignored_and_samples_are_separate():
    scale, zp = _grid(-2.0, 2.0, 3, channels=4)
    g = torch.Generator().manual_seed(0)
    xk, xk1 = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    d = pair_entropy(xk, xk1, (scale, zp), (scale, zp), 3, mask)
    alone = pair_entropy(xk[1:, :4], xk1[1:, :4], (scale, zp), (scale, zp), 3, None)
    assert float(d[1]) == pytest.approx(float(alone[0]), abs=1e-5)
    first = pair_entropy(xk[:1], xk1[:1], (scale, zp), (scale, zp), 3, None)
    assert float(d[0]) == pytest.approx(float(first[0]), abs=1e-5)


def test_banded_joint_matches_dense_for_many_levels():
    bits = 6
    scale, zp = _grid(-3.0, 3.0, bits, channels=5)
    g = torch.Generator().manual_seed(1)
    xk, xk1 = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    dense_k = soft_assign(xk, scale, zp, bits).reshape(2, -1, 64)
    dense_k1 = soft_assign(xk1, scale, zp, bits).reshape(2, -1, 64)
    dense = torch.einsum("bnm,bnp->bmp", dense_k, dense_k1)
    banded = pair_joint(xk, xk1, (scale, zp), (scale, zp), bits, None)  # 64 levels > dense limit -> banded
    assert torch.allclose(banded, dense, atol=1e-4)
    assert float((banded - dense).abs().sum() / dense.sum()) < 1e-4
    idx, w = soft_assign_banded(xk, scale, zp, bits, 4)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_entropy_is_differentiable_in_the_activations():
    scale, zp = _grid(-2.0, 2.0, 4, channels=3)
    x = torch.randn(1, 5, 3, requires_grad=True)
    d = pair_entropy(x, torch.tanh(x) * 1.5, (scale, zp), (scale, zp), 4, None)
    d.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
