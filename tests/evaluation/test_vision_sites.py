"""Where the vision tower loses, on a real W4A4 RTN variant of the bundled model (a second or two)."""

from __future__ import annotations

import pytest

from qvlm.evaluation.vision_sites import SITE_ROLES, site_activation_map, vision_site_errors
from qvlm.quant import QuantConfig, quantize


@pytest.fixture(scope="module")
def variant(bundled):
    return quantize(bundled, QuantConfig.from_bits("W4A4", recipe="rtn", calib_size=4, act_granularity_vision="token"))


def test_each_vision_site_is_measured_alone_and_the_variant_is_left_as_it_was(bundled, variant):
    before = [m.enabled for m in variant.handle.model.modules() if hasattr(m, "granularity")]
    report = vision_site_errors(bundled, variant, n_samples=2)
    after = [m.enabled for m in variant.handle.model.modules() if hasattr(m, "granularity")]
    assert before == after and all(after)
    assert [(r.layer, r.site) for r in report.rows] == [
        (e.index, site) for e in bundled.layer_map.vision for site in SITE_ROLES]
    assert sum(r.share for r in report.rows) == pytest.approx(1.0)
    assert all(r.error >= 0 for r in report.rows) and report.all_on > report.weights_only > 0
    assert report.worst().error == max(r.error for r in report.rows) and report.a_bits == 4


def test_a_variant_with_an_fp_vision_tower_is_refused(bundled):
    fp_vision = quantize(bundled, QuantConfig.from_bits("W4A4", recipe="rtn", calib_size=2, quantize_vision=False))
    with pytest.raises(ValueError, match="full precision"):
        vision_site_errors(bundled, fp_vision, n_samples=2)


def test_the_site_map_holds_one_image_and_both_kinds_of_range(bundled):
    m = site_activation_map(bundled, 1, "fc2", bits=4, n_samples=2)
    tokens, channels = len(m.abs), len(m.abs[0])
    fc2 = bundled.layer_map.vision[1].linears["fc2"]
    assert channels == fc2.in_features and len(m.token_range) == tokens and len(m.channel_range) == channels
    # a per-token range must cover its token's largest channel: typical values span fewer levels
    assert m.levels_token < m.levels_channel
    with pytest.raises(ValueError, match="site"):
        site_activation_map(bundled, 0, "mlp", bits=4)
    with pytest.raises(ValueError, match="layers 0 to"):
        site_activation_map(bundled, 99, "fc1", bits=4)
