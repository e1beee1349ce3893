"""The statistics behind every verdict: R² and its chance level, McNemar's paired test."""

from __future__ import annotations

import math
import random

import pytest

from qvlm.utils.stats import linear_fit, mcnemar, paired_verdict, r2_chance_level, regularized_beta


def test_linear_fit_exact_line_and_noise():
    fit = linear_fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert fit.slope == pytest.approx(2.0) and fit.intercept == pytest.approx(1.0)
    assert fit.r2 == pytest.approx(1.0)
    noisy = linear_fit([0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 3.0])
    assert 0.0 < noisy.r2 < 1.0


def test_linear_fit_degenerate_inputs_are_finite_and_zero():
    for xs, ys in (([], []), ([1.0], [2.0]), ([1, 1, 1], [1, 2, 3]), ([0, 1, 2], [5, 5, 5])):
        fit = linear_fit(xs, ys)
        assert all(math.isfinite(v) for v in fit.to_dict().values()) and fit.r2 == 0.0


def test_regularized_beta_matches_closed_forms():
    # Beta(1, 1) is uniform; Beta(2, 3) has CDF 6x^2 - 8x^3 + 3x^4.
    assert regularized_beta(1, 1, 0.3) == pytest.approx(0.3)
    x = 0.4
    assert regularized_beta(2, 3, x) == pytest.approx(6 * x**2 - 8 * x**3 + 3 * x**4)


def test_r2_chance_level_is_about_four_over_n_and_holds_under_no_correlation():
    assert r2_chance_level(64) == pytest.approx(0.0605, abs=5e-4)  # t(62) two-sided 5%: 1.999
    assert r2_chance_level(2) == 1.0
    assert r2_chance_level(16) > r2_chance_level(64) > r2_chance_level(256)
    rng = random.Random(0)
    n, trials = 32, 2000
    level = r2_chance_level(n)
    exceed = sum(linear_fit([rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]).r2 > level
                 for _ in range(trials))
    assert 0.03 < exceed / trials < 0.07  # 5% by construction


def test_mcnemar_counts_only_discordant_questions():
    a = [True] * 30 + [False] * 5
    b = [False] * 20 + [True] * 15
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"], t["n"]) == (20, 5, 35)
    # exact two-sided binomial: 2 * P(X <= 5), X ~ Bin(25, 1/2)
    assert t["p"] == pytest.approx(2 * sum(math.comb(25, k) for k in range(6)) / 2**25)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
    assert "significantly better than" in paired_verdict("A", "B", t)
    assert "significantly worse than" in paired_verdict("B", "A", mcnemar(b, a))
    assert "no detectable difference" in paired_verdict("A", "B", mcnemar([True, False] * 5, [False, True] * 5))
    with pytest.raises(ValueError, match="same questions"):
        mcnemar([True], [True, False])
