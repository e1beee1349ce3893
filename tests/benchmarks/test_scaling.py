"""The scaling benchmark's fit: what README's 7B projection is computed from (benchmarks/scaling.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import scaling  # noqa: E402


def _row(width: int, depth: int) -> dict:
    """A point whose costs follow known laws: a stage ~ w^2 d, a check ~ d^2, a joint search that stops growing per
    layer once blocks reach their cap (depth >= 4)."""
    stage = 1e-6 * width ** 2 * depth
    joint = 1e-3 * width * depth * (1.0 if depth >= 4 else depth / 4)
    check = 1e-3 * width * depth ** 2
    return {"width": width, "depth": depth, "seconds": stage + joint + check, "peak_extra_bytes": 2 ** 30 * depth,
            "stages": {"init": stage, "search": joint + check},
            "search_parts": {scaling.SEARCH_JOINT: joint, scaling.SEARCH_CHECK: check}}


def test_depth_exponents_come_from_the_deepest_points_and_the_projection_starts_there():
    rows = [_row(w, 2) for w in (512, 1024, 2048)] + [_row(1024, d) for d in (1, 4, 8)]
    fitted = scaling.fit(rows)
    assert fitted["init"]["width_exponent"] == pytest.approx(2.0)
    assert fitted["init"]["depth_exponent"] == pytest.approx(1.0)
    assert fitted[scaling.SEARCH_JOINT]["depth_exponent"] == pytest.approx(1.0)  # capped blocks: linear
    assert fitted[scaling.SEARCH_JOINT]["depth_exponent_all"] > 1.3  # what a fit through depth 1 would claim
    assert fitted[scaling.SEARCH_CHECK]["depth_exponent"] == pytest.approx(2.0)
    deepest = _row(1024, 8)["stages"]["init"]
    assert fitted["init"]["llava_7b_projection"] == pytest.approx(deepest * 4 ** 2 * (32 / 8) * 16)
    assert "| search: acceptance check | 1.00 | 2.00 |" in scaling.table(fitted)
