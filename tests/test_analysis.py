"""DED analysis: per-sample DED >= 0, entropy/qerr per sample, least-squares fits."""

from __future__ import annotations

import pytest

from qvlm.analysis import ded_analysis, ded_sweep
from qvlm.quant import QuantConfig


def test_ded_analysis_on_the_bundled_model(bundled):
    cfg = QuantConfig(recipe="qvlm-cdm", calib_size=8, calib_batch=4)
    a = ded_analysis(bundled, cfg, layer=2, n_samples=8)
    assert a.layer == 2 and a.block == [2, 3] and a.n_samples == 8 and len(a.points) == 8
    for p in a.points:
        assert {"entropy", "ded", "qerr", "sample"} <= set(p)
        assert p["ded"] >= 0 and p["entropy"] > 0 and p["qerr"] > 0
        assert p["ded"] == pytest.approx(max(0.0, p["greedy_error"] - p["joint_error"]), abs=1e-9)
    assert set(a.fit) == {"slope", "intercept", "r2"} and 0.0 <= a.fit["r2"] <= 1.0
    assert set(a.qerr_fit) == {"slope", "intercept", "r2"}


def test_ded_sweep_covers_every_pair_and_rejects_bad_layers(bundled):
    n = len(bundled.layer_map.language)
    cfg = QuantConfig(recipe="qvlm-cdm", calib_size=4, calib_batch=4)
    sweep = ded_sweep(bundled, cfg, n_samples=4)
    assert [a.layer for a in sweep] == list(range(n - 1))
    with pytest.raises(ValueError, match="layer"):
        ded_analysis(bundled, cfg, layer=n - 1, n_samples=4)
    with pytest.raises(ValueError, match="fp"):
        ded_analysis(bundled, QuantConfig(recipe="fp"), layer=0, n_samples=4)
