"""QuantConfig: defaults, JSON round trip, bit-string parsing, clear errors for bad values."""

from __future__ import annotations

import json

import pytest

from qvlm.quant import RECIPES, QuantConfig
from qvlm.quant.config import RECIPE_NAMES
from qvlm.quant.recipes import resolve_weights


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
    assert resolve_weights(QuantConfig(recipe="qlora")) == ("nf4", 64)
    assert resolve_weights(QuantConfig(recipe="qvlm")) == ("nf4", 64)  # Q-VLM keeps the baseline's weights
    assert resolve_weights(QuantConfig(recipe="rtn")) == ("uniform", None)
    assert resolve_weights(QuantConfig(recipe="awq")) == ("uniform", 64)
    assert resolve_weights(QuantConfig(recipe="qvlm", weight_format="uniform")) == ("uniform", None)
    assert resolve_weights(QuantConfig(recipe="qlora", weight_group_size=32)) == ("nf4", 32)


def test_config_names_exactly_the_recipes_of_the_table():
    assert RECIPE_NAMES == RECIPES


def test_config_imports_no_stage():
    import ast
    import inspect

    import qvlm.quant.config as config

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(config))) if isinstance(n, ast.ImportFrom)}
    allowed = {"qvlm.quant.quantizers", "qvlm.quant.presets"}
    assert not {m for m in imported if m and m.startswith("qvlm.quant.") and m not in allowed}


def test_vision_bits_default_to_the_runs_and_show_in_the_label_when_they_differ():
    cfg = QuantConfig.from_bits("W4A4", recipe="rtn")
    assert cfg.tower_bits("vision") == cfg.tower_bits("language") == (4, 4) and cfg.bits_label == "W4A4"
    cfg = QuantConfig.from_bits("W4A4", recipe="rtn", vision_a_bits=8)
    assert cfg.tower_bits("vision") == (4, 8) and cfg.tower_bits("language") == (4, 4)
    assert cfg.bits_label == "W4A4 (vision W4A8)"
    assert QuantConfig.from_bits("W4A4", recipe="rtn", vision_w_bits=4, vision_a_bits=4).bits_label == "W4A4"
    assert cfg.replace(quantize_vision=False).bits_label == "W4A4"  # an FP vision tower has no bits
    assert QuantConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("changes", [{"vision_w_bits": 1}, {"vision_a_bits": 9}, {"vision_a_bits": 4.0},
                                     {"vision_w_bits": True}])
def test_bad_vision_bits_give_clear_errors(changes):
    (name,) = changes
    with pytest.raises(ValueError, match=f"{name} must be a whole number of bits from 2 to 8"):
        QuantConfig(**changes).validate()


def test_vision_bits_reach_the_vision_linears_and_the_llm_keeps_the_runs(bundled):
    from qvlm.quant import quantize
    from qvlm.quant.memory import weight_memory

    cfg = QuantConfig.from_bits("W4A4", recipe="rtn", vision_w_bits=6, vision_a_bits=8, calib_size=2, calib_batch=2)
    result = quantize(bundled, cfg)
    bits = {}
    for module in result.handle.model.modules():
        if getattr(module, "tower", None) in ("vision", "language"):
            bits.setdefault(module.tower, set()).add((module.w_bits, module.act.bits))
    assert bits == {"vision": {(6, 8)}, "language": {(4, 4)}}
    # the memory count reads the packed codes: the vision weights at 6 bits a weight
    linears = [m for m in result.handle.model.modules() if getattr(m, "tower", None) == "vision"]
    codes = sum(m.packed.numel() * m.packed.element_size() for m in linears)
    assert codes == sum(m.out_features * m.in_features for m in linears) * 6 // 8
    assert weight_memory(result.handle.model).by_family["vision"].quant_bytes > codes
