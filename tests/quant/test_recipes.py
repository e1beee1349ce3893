"""Recipes as tuples of configured stages: each stage owns its settings, the config saves them flat."""

from __future__ import annotations

import dataclasses

import pytest

from qvlm.quant import QuantConfig, quantize
from qvlm.quant.cdm import CrossLayerDependencyMining
from qvlm.quant.layerwise import LayerwiseInit
from qvlm.quant.config import saved_settings
from qvlm.quant.recipes import QLORA_INIT, RECIPE_INFO, configured_stages
from qvlm.quant.veo import VisualEncoderOptimization

STAGE_CLASSES = (LayerwiseInit, VisualEncoderOptimization, CrossLayerDependencyMining)


def test_every_saved_setting_is_a_stage_field_with_the_stage_s_default():
    """The flat config is the saved form of the stages' settings, not a second copy of them: its defaults are
    the stages' own, and every stage setting has exactly one saved field."""
    config_fields = {f.name: f for f in dataclasses.fields(QuantConfig)}
    saved_names = []
    for cls in STAGE_CLASSES:
        stage_fields = {f.name: f for f in dataclasses.fields(cls)}
        for field, saved in cls.SAVED_AS.items():
            assert field in stage_fields, (cls.__name__, field)
            assert saved in config_fields, (cls.__name__, saved)
            assert config_fields[saved].default == stage_fields[field].default, saved
            saved_names.append(saved)
    assert len(saved_names) == len(set(saved_names)), "two stage settings saved under one name"


def test_a_config_configures_its_recipe_s_stages():
    cfg = QuantConfig(recipe="qvlm", veo_lr=0.05, max_block_depth=2, init_lp_norm=0.5, cdm_accept="block",
                      percentiles=[1.0, 0.99])
    init, veo, cdm = configured_stages(cfg)
    assert (init.weights, init.act_init, init.lp_norm) == ("nf4", "lp", 0.5)
    assert veo.lr == 0.05 and veo.epochs == 10
    assert (cdm.max_block_depth, cdm.accept, cdm.percentiles) == (2, "block", (1.0, 0.99))
    assert [type(s) for s in configured_stages(QuantConfig(recipe="qvlm-cdm"))] == [LayerwiseInit, CrossLayerDependencyMining]
    assert configured_stages(QuantConfig(recipe="fp")) == ()
    # the named recipes keep their stages at the defaults; a default config configures them as they are
    for name, recipe in RECIPE_INFO.items():
        assert configured_stages(QuantConfig(recipe=name)) == recipe.stages


def test_stages_round_trip_through_the_saved_form():
    stages = (QLORA_INIT, VisualEncoderOptimization(lr=0.05, epochs=3), CrossLayerDependencyMining(max_block_depth=2))
    cfg = QuantConfig(recipe="qvlm").with_stages(stages)
    assert (cfg.veo_lr, cfg.veo_epochs, cfg.max_block_depth) == (0.05, 3, 2)
    assert configured_stages(QuantConfig.from_json(cfg.to_json())) == stages


def test_two_stages_of_one_kind_with_different_settings_have_no_saved_form():
    with pytest.raises(ValueError, match="two VisualEncoderOptimization stages set lr"):
        saved_settings((VisualEncoderOptimization(lr=0.01), VisualEncoderOptimization(lr=0.05)))
    assert saved_settings((VisualEncoderOptimization(), VisualEncoderOptimization()))["veo_lr"] == 0.02


def test_a_bad_stage_setting_is_refused_with_its_saved_name():
    with pytest.raises(ValueError, match="veo_lr"):
        QuantConfig().with_stages((VisualEncoderOptimization(lr=-1.0),))


def test_a_run_of_configured_stages_uses_their_settings_and_saves_them(bundled):
    """"VEO with its own learning rate, then CDM of depth 2", written as stages: the run uses their settings (blocks
    of at most two layers, one VEO epoch) while the config it was given says otherwise, and its result saves them."""
    cfg = QuantConfig(recipe="qvlm", calib_size=8, calib_batch=4, max_block_depth=3, veo_epochs=5,
                      veo_holdout_images=0)
    stages = (QLORA_INIT, VisualEncoderOptimization(lr=0.05, epochs=1, holdout_images=0),
              CrossLayerDependencyMining(max_block_depth=2, accept="block"))
    result = quantize(bundled, cfg, stages=stages)
    assert max(len(b) for b in result.blocks) <= 2
    assert {s.epoch for s in result.veo_losses} == {1} and len(result.veo_losses) == 2  # 8 pairs, batches of 4
    assert (result.config.veo_lr, result.config.veo_epochs, result.config.max_block_depth,
            result.config.cdm_accept) == (0.05, 1, 2, "block")
    assert configured_stages(result.config) == stages
