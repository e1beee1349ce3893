"""The statistics the project reports: least-squares R², its chance level, McNemar's paired test.

Pure Python on plain numbers (no torch, no scipy), so the analysis, the bench and the plots share
one definition of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence
from qvlm.utils.records import JsonRecord


@dataclass(frozen=True)
class LinearFit(JsonRecord):
    """y = slope * x + intercept, and the share of y's variance it explains (R²)."""

    slope: float = 0.0
    intercept: float = 0.0
    r2: float = 0.0

    def at(self, x: float) -> float:
        return self.slope * x + self.intercept


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least-squares line y = slope * x + intercept and its R² (as on the paper's Fig. 2).

    A degenerate input (fewer than two points, or x or y constant) gives slope 0 and R² 0
    rather than NaN: "nothing to explain" reads as no fit.
    """
    n = len(xs)
    if n == 0:
        return LinearFit()
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return LinearFit(intercept=my)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx
    r2 = sxy * sxy / (sxx * syy) if syy > 0 else 0.0
    return LinearFit(slope, my - slope * mx, r2 if math.isfinite(r2) else 0.0)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of Beta(a, b) at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def r2_chance_level(n: int, alpha: float = 0.05) -> float:
    """The R² that n points with no correlation at all exceed with probability ``alpha``.

    Under no correlation (normal noise) R² of a simple regression follows Beta(1/2, (n-2)/2);
    this is its (1 - alpha) quantile, about 4/n for alpha = 0.05. An R² below it is what chance
    alone gives one time in twenty. Returns 1.0 for n < 3 (nothing can be told apart).
    """
    if n < 3:
        return 1.0
    a, b = 0.5, (n - 2) / 2.0
    lo, hi = 0.0, 1.0
    for _ in range(100):  # bisection on the CDF
        mid = (lo + hi) / 2
        if regularized_beta(a, b, mid) < 1.0 - alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact test of two methods answering the *same* questions.

    Only the discordant questions count: ``a_only`` (A right, B wrong) and ``b_only``. Under "no
    difference" each discordant question is a fair coin, so the two-sided p-value is the exact
    binomial tail of min(a_only, b_only) out of a_only + b_only, doubled (capped at 1).
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"McNemar needs the same questions: {len(correct_a)} vs {len(correct_b)} answers")
    a_only = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = a_only + b_only
    if n == 0:
        p = 1.0
    else:
        k = min(a_only, b_only)
        tail = sum(math.comb(n, i) for i in range(k + 1))
        p = min(1.0, 2.0 * math.exp(math.log(tail) - n * math.log(2.0)))
    return {"a_only": a_only, "b_only": b_only, "n": len(correct_a), "p": p}


def paired_verdict(name_a: str, name_b: str, test: dict[str, float], alpha: float = 0.05) -> str:
    """One sentence: A significantly better / worse than B, or no detectable difference (p = ...)."""
    p = test["p"]
    if p < alpha and test["a_only"] != test["b_only"]:
        word = "significantly better than" if test["a_only"] > test["b_only"] else "significantly worse than"
    else:
        word = "no detectable difference from"
    return (f"{name_a} {word} {name_b} (p = {p:.3g}; {test['a_only']} questions only {name_a} got right, "
            f"{test['b_only']} only {name_b})")


def finite(x: Any) -> bool:
    """A number that is not None, NaN or infinite (a plotted or quoted value must be one)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def percent_change(before: float, after: float) -> float:
    """(after - before) / before in %, 0 when ``before`` is not positive."""
    return 100 * (after - before) / before if before > 0 else 0.0
