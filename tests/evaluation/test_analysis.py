"""DED analysis: per-sample DED >= 0, entropy/qerr per sample, least-squares fits."""

from __future__ import annotations

from dataclasses import replace

import pytest

import torch

from qvlm.evaluation.analysis import PairSummary, ded_analysis, ded_sweep, dependency_diagnostics, dependency_verdict, \
    interaction_share
from qvlm.quant.records import HeldOutError, VeoEpoch
from qvlm.utils.stats import r2_chance_level
from qvlm.quant import QuantConfig, get_preset


def test_ded_analysis_on_the_bundled_model(bundled):
    cfg = QuantConfig(recipe="qvlm-cdm", calib_size=8, calib_batch=4)
    a = ded_analysis(bundled, cfg, layer=2, n_samples=8)
    assert a.layer == 2 and a.block == [2, 3] and a.n_samples == 8 and len(a.points) == 8
    for p in a.points:
        assert {"entropy", "ded", "qerr", "sample"} <= set(p.to_dict())
        assert p.ded >= 0 and p.entropy > 0 and p.qerr > 0
        assert p.ded == pytest.approx(max(0.0, p.greedy_error - p.joint_error), abs=1e-9)
    assert set(a.fit.to_dict()) == {"slope", "intercept", "r2"} and 0.0 <= a.fit.r2 <= 1.0
    assert set(a.qerr_fit.to_dict()) == {"slope", "intercept", "r2"}


def test_ded_sweep_covers_every_pair_and_rejects_bad_layers(bundled):
    n = len(bundled.layer_map.language)
    cfg = QuantConfig(recipe="qvlm-cdm", calib_size=4, calib_batch=4)
    sweep = ded_sweep(bundled, cfg, n_samples=4)
    assert [a.layer for a in sweep] == list(range(n - 1))
    with pytest.raises(ValueError, match="layer"):
        ded_analysis(bundled, cfg, layer=n - 1, n_samples=4)
    with pytest.raises(ValueError, match="fp"):
        ded_analysis(bundled, QuantConfig(recipe="fp"), layer=0, n_samples=4)
    deployable = QuantConfig(**{**get_preset("deployable").values, "recipe": "rtn"})  # per-token ranges at run time
    with pytest.raises(ValueError, match="dynamic_token"):
        ded_sweep(bundled, deployable, n_samples=4)


def test_interaction_share_is_zero_for_additive_tables_and_one_for_pure_interaction():
    a = torch.tensor([0.0, 1.0, 3.0])
    b = torch.tensor([0.5, 2.0, 2.5])
    assert interaction_share(a[:, None] + b[None, :]) == pytest.approx(0.0, abs=1e-12)
    assert interaction_share(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])) == pytest.approx(1.0)
    mixed = a[:, None] + b[None, :] + 0.3 * torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert 0.0 < interaction_share(mixed) < 1.0


def test_dependency_diagnostics_on_the_bundled_model(bundled):
    n = len(bundled.layer_map.language)
    report = dependency_diagnostics(bundled, QuantConfig(recipe="qvlm-cdm", calib_size=4, calib_batch=4), n_samples=4)
    rows = report.summaries
    assert [r.layer for r in rows] == list(range(n - 1))
    assert [PairSummary.from_dict(r) for r in report.to_dict()["pairs"]] == rows  # the stored form reads back
    for r in rows:
        assert 0.0 <= r.interaction_share <= 1.0 and 0.0 <= r.zero_ded_fraction <= 1.0
        assert r.r2_chance == pytest.approx(r2_chance_level(4)) and r.gain > 0 and r.branch_response >= 0
        assert r.mean_ded >= 0
    # the verdict is computed from the rows, never a fixed text
    assert report.verdict == dependency_verdict(rows) and "of 7 pairs" in report.verdict
    flipped = [replace(r, interaction_share=0.5, joint_equals_greedy=False, controllable_share=0.5) for r in rows]
    assert dependency_verdict(flipped).startswith("On this model the layers interact:")
    flat = [replace(r, interaction_share=0.01, joint_equals_greedy=True) for r in rows]
    assert dependency_verdict(flat).startswith("On this model the layers' quantization errors add up")
    # "layers interact" needs at least a quarter of the pairs: 3 of 15 is not, 4 of 15 is
    fifteen = [replace(flat[0], layer=k) for k in range(15)]
    three = [replace(r, interaction_share=0.5, joint_equals_greedy=False, controllable_share=0.5) if k < 3 else r
             for k, r in enumerate(fifteen)]
    four = [replace(r, interaction_share=0.5, joint_equals_greedy=False, controllable_share=0.5) if k < 4 else r
            for k, r in enumerate(fifteen)]
    assert dependency_verdict(three).startswith("On this model the layers' quantization errors add up")
    assert dependency_verdict(four).startswith("On this model the layers interact:")


def _held_out_row(epoch, output, kl, agree=0.98, kept=False, ceiling_kl=None):
    ceiling = None if ceiling_kl is None else HeldOutError(0.0, output / 4, output / 4, 1.0, ceiling_kl, 128)
    return VeoEpoch(epoch, HeldOutError(0.01, output, 0.01 + output, agree, kl, 128), kept, ceiling)


def test_the_veo_outcome_is_computed_once_from_the_held_out_log():
    """The numbers (qvlm.evaluation.analysis); the words are qvlm.ui.explain's and read only these."""
    from qvlm.evaluation.analysis import VEO_SHARE_NEGLIGIBLE, veo_outcome
    from qvlm.ui.explain import veo_sentence

    log = [_held_out_row(0, 0.02, 0.10, ceiling_kl=0.04), _held_out_row(1, 0.01, 0.07, kept=True),
           _held_out_row(2, 0.015, 0.08)]
    o = veo_outcome(log)
    assert (o.kept_epoch, o.epochs) == (1, 2) and o.error_before == pytest.approx(0.03) and o.error_after == 0.02
    assert o.vision_share == pytest.approx(0.6) and o.kl_after == 0.07
    assert "causes 60% of that divergence; VEO removed 50% of that part" in veo_sentence(o)
    small = veo_outcome([_held_out_row(0, 0.02, 0.100, ceiling_kl=0.095), _held_out_row(1, 0.01, 0.099, kept=True)])
    assert small.vision_share < VEO_SHARE_NEGLIGIBLE and "hardly change the answers" in veo_sentence(small)
    assert veo_outcome([]) is None and veo_outcome(None) is None


def test_the_analysis_tab_shows_each_bundled_model_s_stored_diagnostics(tmp_path):
    import json

    from qvlm.ui.panel_analysis import measured_interaction_markdown

    adds_up, interacts, absent = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (adds_up, interacts, absent):
        folder.mkdir()
    pair = {"layer": 0, "block": [0, 1], "n": 16, "r2_entropy": 0.1, "r2_qerr": 0.0, "r2_chance": 0.25,
            "interaction_share": 0.02, "joint_equals_greedy": True}
    (adds_up / "dependency_report.json").write_text(json.dumps({"W4A3": {
        "samples": 16, "pairs": [pair] * 3, "verdict": "On this model the layers' quantization errors add up: x"}}))
    (interacts / "dependency_report.json").write_text(json.dumps({"W4A3": {
        "samples": 16, "pairs": [pair, dict(pair, interaction_share=0.3, joint_equals_greedy=False, r2_entropy=0.4)],
        "verdict": "On this model the layers interact: y"}}))
    text = measured_interaction_markdown({"easy": adds_up, "mosaic": interacts, "other": absent})
    assert "| easy | W4A3 (16 samples) | 0 of 3 | 0 of 3 | 0 of 3 | On this model the layers' quantization errors add up |" \
        in text
    assert "| mosaic | W4A3 (16 samples) | 1 of 2 | 1 of 2 | 1 of 2 | On this model the layers interact |" in text
    assert "No stored report for other" in text
    assert "No stored diagnostics yet" in measured_interaction_markdown({"other": absent})
