"""Eq. 7 partition on constructed entropies: threshold on the span average, maximum depth."""

from __future__ import annotations

import pytest

from qvlm.quant.cdm import CrossLayerDependencyMining
from qvlm.quant.config import QuantConfig
from qvlm.quant.partition import partition_layers, singleton_blocks
from qvlm.quant.recipes import configured_stages


def _covers(blocks, n):
    flat = [k for b in blocks for k in b]
    return flat == list(range(n)) and all(b == list(range(b[0], b[-1] + 1)) for b in blocks)


def test_all_below_threshold_gives_single_layers():
    assert partition_layers([1.0, 1.0, 1.0], h0=2.0, max_depth=3) == [[0], [1], [2], [3]]


def test_all_above_threshold_gives_blocks_of_max_depth():
    assert partition_layers([5.0] * 7, h0=1.0, max_depth=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert partition_layers([5.0] * 7, h0=1.0, max_depth=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition_layers([5.0] * 7, h0=1.0, max_depth=1) == singleton_blocks(8)


def test_threshold_is_on_the_average_of_the_span():
    # D(0,1)=3, D(1,2)=0.5: average 1.75 > h0=1.5 -> layers 0..2 join; a third pair would exceed depth 3
    assert partition_layers([3.0, 0.5, 9.0], h0=1.5, max_depth=3) == [[0, 1, 2], [3]]
    # same pairs, h0=2: average 1.75 < 2 -> the block stops at layers 0..1
    assert partition_layers([3.0, 0.5, 9.0], h0=2.0, max_depth=3) == [[0, 1], [2, 3]]


def test_strict_inequality_and_a_low_pair_splits():
    assert partition_layers([2.0, 2.0], h0=2.0, max_depth=3) == [[0], [1], [2]]
    # pair (0,1) is low: layer 0 alone; from layer 1 the span average stays above h0 up to depth 3
    assert partition_layers([0.1, 5.0, 0.1, 5.0], h0=1.0, max_depth=3) == [[0], [1, 2, 3], [4]]
    # with depth 2 the low pair (2,3) then starts a block that cannot grow
    assert partition_layers([0.1, 5.0, 0.1, 5.0], h0=1.0, max_depth=2) == [[0], [1, 2], [3, 4]]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_partition_is_a_cover_and_respects_depth(depth):
    import random

    rng = random.Random(depth)
    for _ in range(50):
        n = rng.randint(1, 12)
        ent = [rng.uniform(0, 3) for _ in range(n - 1)]
        blocks = partition_layers(ent, CrossLayerDependencyMining().h0_value(ent), depth)
        assert _covers(blocks, n)
        assert max(len(b) for b in blocks) <= depth


def test_h0_rules():
    def h0(rule: str, values: list[float]) -> float:  # through the saved form, as a run configures its stage
        (cdm,) = [s for s in configured_stages(QuantConfig(recipe="qvlm-cdm", h0_rule=rule))
                  if isinstance(s, CrossLayerDependencyMining)]
        return cdm.h0_value(values)

    assert h0("mean", [1.0, 2.0, 6.0]) == pytest.approx(3.0)
    assert h0("median", [1.0, 2.0, 6.0]) == pytest.approx(2.0)
    assert h0("quantile:1.0", [1.0, 2.0, 6.0]) == pytest.approx(6.0)
    assert h0("value:0.25", [1.0, 2.0]) == pytest.approx(0.25)
