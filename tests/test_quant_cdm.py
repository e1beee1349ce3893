"""CDM's guarantees on the bundled model: the incumbent is a candidate, and the final-output check."""

from __future__ import annotations

import pytest

from qvlm.quant import QuantConfig, quantize

FAST = dict(calib_size=8, calib_batch=4, max_block_depth=2)


@pytest.mark.parametrize("objective", ["normed_hidden", "linear_output", "residual"])
def test_every_block_objective_ends_no_worse_than_the_incumbent(bundled, objective):
    res = quantize(bundled, QuantConfig(recipe="qvlm-cdm", block_objective=objective, **FAST))
    assert res.search and all(s["objective"] == objective for s in res.search)
    assert all(s["error"] <= s["incumbent_error"] + 1e-12 for s in res.search)


def test_the_final_output_check_puts_rejected_blocks_back_at_their_incumbent(bundled):
    res = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="final_output", **FAST))
    for s in res.search:
        assert isinstance(s["accepted"], bool)
        if not s["accepted"]:
            assert all(res.percentiles[k] is None for k in s["block"])  # None: the init's ranges
    blockwise = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="block", **FAST))
    assert all(s["accepted"] for s in blockwise.search)
