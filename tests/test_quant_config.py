"""QuantConfig: defaults, JSON round trip, bit-string parsing, clear errors for bad values."""

from __future__ import annotations

import json

import pytest

from qvlm.quant import RECIPES, QuantConfig


def test_defaults_follow_the_paper():
    cfg = QuantConfig()
    assert cfg.calib_size == 64 and cfg.calib_batch == 8 and cfg.calib_seed == 0
    assert cfg.percentiles == (1.0, 0.995, 0.99, 0.985, 0.98)
    assert cfg.max_block_depth == 3 and cfg.h0_rule == "mean" and cfg.veo_epochs == 10
    assert cfg.weight_group_size is None
    assert RECIPES == ("fp", "rtn", "qlora", "awq", "qvlm-cdm", "qvlm-veo", "qvlm")


def test_json_round_trip_preserves_every_field():
    cfg = QuantConfig(recipe="qlora", w_bits=6, a_bits=6, percentiles=(1.0, 0.99), h0_rule="quantile:0.75",
                      weight_group_size=64, weight_format="nf4", veo_lr=3e-4)
    text = cfg.to_json()
    assert json.loads(text)["percentiles"] == [1.0, 0.99]
    back = QuantConfig.from_json(text)
    assert back == cfg
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("text,bits", [("W4A4", (4, 4)), ("w6a6", (6, 6)), (" W8A8 ", (8, 8)), ("W3A3", (3, 3)),
                                       ("w4a8", (4, 8))])
def test_from_bits(text, bits):
    cfg = QuantConfig.from_bits(text, recipe="rtn", calib_size=8)
    assert (cfg.w_bits, cfg.a_bits) == bits and cfg.recipe == "rtn" and cfg.calib_size == 8
    assert cfg.bits_label == f"W{bits[0]}A{bits[1]}"


@pytest.mark.parametrize("text", ["W4", "4/4", "W16A16", "W1A1", "fp16", ""])
def test_from_bits_rejects_nonsense(text):
    with pytest.raises(ValueError):
        QuantConfig.from_bits(text)


@pytest.mark.parametrize("changes,needle", [
    ({"recipe": "gptq"}, "unknown recipe"),
    ({"w_bits": 1}, "w_bits"),
    ({"a_bits": 9}, "a_bits"),
    ({"w_bits": 4.5}, "w_bits"),
    ({"calib_size": 0}, "calib_size"),
    ({"calib_batch": -2}, "calib_batch"),
    ({"percentiles": ()}, "percentiles"),
    ({"percentiles": (1.0, 1.2)}, "percentiles"),
    ({"percentiles": (1.0, 1.0)}, "repeated"),
    ({"max_block_depth": 0}, "max_block_depth"),
    ({"h0_rule": "average"}, "h0_rule"),
    ({"h0_rule": "quantile:2"}, "quantile"),
    ({"soft_temperature": 0.0}, "soft_temperature"),
    ({"veo_lr": -1.0}, "veo_lr"),
    ({"veo_epochs": -1}, "veo_epochs"),
    ({"veo_lambda1": float("nan")}, "veo_lambda1"),
    ({"weight_format": "int4"}, "weight_format"),
    ({"weight_group_size": 1}, "weight_group_size"),
    ({"act_granularity_vision": "row"}, "act_granularity_vision"),
    ({"joint_search": "random"}, "joint_search"),
    ({"quantize_vision": "yes"}, "quantize_vision"),
])
def test_bad_values_give_clear_errors(changes, needle):
    with pytest.raises(ValueError, match=needle):
        QuantConfig(**changes).validate()


def test_from_dict_rejects_unknown_fields_and_bad_json():
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"bits": 4})
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantConfig.from_json("{nope")


def test_weight_format_auto_follows_the_recipe():
    assert QuantConfig(recipe="qlora").resolved_weights() == ("nf4", 64)
    assert QuantConfig(recipe="qvlm").resolved_weights() == ("nf4", 64)  # Q-VLM keeps the baseline's weights
    assert QuantConfig(recipe="rtn").resolved_weights() == ("uniform", None)
    assert QuantConfig(recipe="awq").resolved_weights() == ("uniform", 64)
    assert QuantConfig(recipe="qvlm", weight_format="uniform").resolved_weights() == ("uniform", None)
    assert QuantConfig(recipe="qlora", weight_group_size=32).resolved_weights() == ("nf4", 32)
