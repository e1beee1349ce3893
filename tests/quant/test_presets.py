"""Presets: valid values with a source, QuantConfig() is "recommended", from_bits applies a preset then overrides."""

from __future__ import annotations

from dataclasses import fields

import pytest

from qvlm.quant import PRESET_NAMES, PRESETS, QuantConfig, get_preset


def test_presets_come_in_menu_order_with_the_recommended_one_first():
    assert PRESET_NAMES == ("recommended", "paper", "authors-code", "deployable", "integer")
    assert all(PRESETS[name].name == name for name in PRESET_NAMES)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_sets_real_fields_to_valid_values_and_says_where_they_come_from(name):
    preset = get_preset(name)
    assert set(preset.values) <= {f.name for f in fields(QuantConfig)} - {"recipe", "w_bits", "a_bits", "preset"}
    assert preset.label and preset.source and preset.description.endswith(".")
    cfg = QuantConfig.from_bits("W4A4", recipe="qvlm", preset=name)
    assert cfg.preset == name and all(getattr(cfg, k) == v for k, v in preset.values.items())
    assert cfg.preset_differences() == {}


def test_preset_values_cannot_be_changed_by_a_caller():
    with pytest.raises(TypeError):
        PRESETS["recommended"].values["act_granularity_vision"] = "token"


def test_the_default_config_is_the_recommended_preset():
    """The dataclass defaults must equal the recommended preset's values: change both together."""
    default = QuantConfig()
    assert default.preset == "recommended"
    assert all(getattr(default, k) == v for k, v in get_preset("recommended").values.items())
    assert default == QuantConfig.from_bits("W4A4", recipe="qvlm", preset="recommended")
    assert default.preset_differences() == {}


def test_the_paper_and_authors_code_presets_hold_their_settings():
    paper = QuantConfig.from_bits("W4A4", preset="paper")
    assert (paper.act_granularity_vision, paper.act_granularity_language) == ("token", "channel")
    assert paper.quantize_vision and not paper.quantize_projector and paper.weight_format == "auto"
    code = QuantConfig.from_bits("W4A4", preset="authors-code")
    assert not code.quantize_vision and code.weight_format == "nf4" and code.init_lp_norm == 0.5
    assert code.to_dict()["preset"] == "authors-code"


def test_from_bits_applies_the_preset_then_the_overrides():
    cfg = QuantConfig.from_bits("w4a4", recipe="rtn", preset="paper", act_granularity_vision="tensor", calib_size=8)
    assert cfg.act_granularity_vision == "tensor"  # the override wins over the preset
    assert cfg.quantize_vision and cfg.calib_size == 8 and cfg.preset == "paper"


def test_preset_differences_name_each_field_that_departs_from_the_preset():
    cfg = QuantConfig.from_bits("W6A6", recipe="rtn", preset="paper", act_granularity_vision="channel",
                                percentiles=(1.0, 0.99), calib_size=8)
    assert cfg.preset_differences() == {"act_granularity_vision": ("token", "channel"),
                                        "percentiles": ([1.0, 0.995, 0.99, 0.985, 0.98], [1.0, 0.99]),
                                        "calib_size": (64, 8)}  # recipe and bits are the run's, not the preset's
    # a config saved without its preset (older runs) is compared with the recommended one
    assert QuantConfig.from_dict({"act_granularity_vision": "token"}).preset_differences() == {
        "act_granularity_vision": ("channel", "token")}


def test_an_unknown_preset_is_a_clear_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'fast'; choose one of: recommended, paper, authors-code, deployable"):
        get_preset("fast")
    with pytest.raises(ValueError, match="unknown preset"):
        QuantConfig.from_bits("W4A4", preset="fast")
    with pytest.raises(ValueError, match="unknown preset"):
        QuantConfig.from_dict({"preset": "fast"})


def test_presets_import_nothing_from_the_quantization_package():
    """So the config can import them without a cycle."""
    import ast
    import inspect

    import qvlm.quant.presets as presets

    tree = ast.parse(inspect.getsource(presets))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("qvlm")}
