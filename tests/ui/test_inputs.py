"""Input checks behind the panels: images, the quantize form, settings (no model needed)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from qvlm.quant import BIT_SETTINGS, MENU_ORDER, QuantConfig, get_recipe
from qvlm.ui.images import MAX_SIDE, ImageError, load_user_image
from qvlm.ui.render import AnswerCard, answers_html, variants_markdown
from qvlm.ui.panel_quantize import FIRST_RUN_CALIB_PAIRS, QuantizePanel, config_from_form, parse_percentiles
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import AppState
from qvlm.ui.run_size import DEFAULT_RUN_SIZE, RUN_SIZES


def test_no_image_message():
    for empty in (None, "", "  "):
        with pytest.raises(ImageError, match="add an image"):
            load_user_image(empty)


def test_not_an_image_message(tmp_path: Path):
    f = tmp_path / "notes.txt"
    f.write_text("hello, I am not a picture")
    with pytest.raises(ImageError, match="not an image"):
        load_user_image(str(f))


def test_truncated_image_message(tmp_path: Path):
    good = tmp_path / "x.png"
    Image.new("RGB", (300, 300), "red").save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match="could not be read|not an image"):
        load_user_image(str(bad))


def test_large_image_is_downscaled_with_a_note(tmp_path: Path):
    f = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), "blue").save(f)
    img, note = load_user_image(str(f))
    assert max(img.size) == MAX_SIDE and "downscaled" in note


def test_huge_image_is_refused_before_decoding(tmp_path: Path):
    f = tmp_path / "huge.png"
    # a 1-bit 8000x8000 PNG is tiny on disk but 64 megapixels
    Image.new("1", (8000, 8000)).save(f)
    with pytest.raises(ImageError, match="too large"):
        load_user_image(str(f))


def test_example_images_load_and_match_the_json():
    import json

    meta = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert 4 <= len(meta["images"]) <= 8
    for item in meta["images"]:
        img, note = load_user_image(str(EXAMPLES_DIR / item["file"]))
        assert img.size == (64, 64) and note == ""
        assert item["questions"]


def test_percentile_text_becomes_numbers():
    assert parse_percentiles("1.0, 0.995 0.99;0.98") == (1.0, 0.995, 0.99, 0.98)
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_percentiles("1.0, abc")


def _form(**changes):
    """The quantize form's values (as Gradio passes them: numbers may be floats), with some changed."""
    values = dict(bits="W4A4", recipe="qvlm", calib_size=8.0, max_block_depth=3.0, h0_rule="mean",
                  percentiles="1.0, 0.99", veo_epochs=2.0, veo_eta=1.0, veo_lambda1=0.01, veo_lambda2=1.0)
    return {**values, **changes}


def test_form_becomes_a_quant_config():
    cfg = config_from_form(**_form(h0_rule=" 0.25 ", percentiles="1.0, 0.995 0.99;0.98"))
    assert (cfg.w_bits, cfg.a_bits, cfg.recipe) == (4, 4, "qvlm")
    assert cfg.calib_size == 8 and isinstance(cfg.calib_size, int) and cfg.veo_epochs == 2
    assert cfg.h0_rule == "value:0.25" and cfg.percentiles == (1.0, 0.995, 0.99, 0.98)
    assert config_from_form(**_form(h0_rule="Median")).h0_rule == "median"


@pytest.mark.parametrize("change, field", [
    ({"calib_size": 0}, "calib_size"),
    ({"calib_size": 2.5}, "calib_size"),
    ({"percentiles": ""}, "percentiles"),
    ({"percentiles": "1.2"}, "percentiles"),
    ({"percentiles": "0.99, 0.99"}, "percentiles"),
    ({"h0_rule": "biggest"}, "h0_rule"),
    ({"veo_eta": -1.0}, "veo_eta"),
    ({"veo_lambda1": None}, "veo_lambda1"),
    ({"recipe": "nope"}, "recipe"),
])
def test_bad_form_values_get_the_configs_own_message(change, field):
    with pytest.raises(ValueError, match=field):
        config_from_form(**_form(**change))


def test_quantize_form_offers_the_cores_recipes_bits_and_defaults(bundled_dir):
    panel = QuantizePanel(AppState.from_settings(Settings(default_model=str(bundled_dir), preload=False)))
    with gr.Blocks():
        panel.layout()
    assert panel.recipe.choices == [(get_recipe(name).label, name) for name in MENU_ORDER]
    assert panel.recipe.choices[0][1] == "qvlm" and "fp" not in [v for _, v in panel.recipe.choices]
    assert [v for _, v in panel.bits.choices] == list(BIT_SETTINGS)
    defaults = QuantConfig()
    assert (panel.bits.value, panel.recipe.value) == (defaults.bits_label, defaults.recipe)
    assert panel.percentiles.value == ", ".join(f"{p:g}" for p in defaults.percentiles)
    assert (panel.max_block_depth.value, panel.h0_rule.value) == (defaults.max_block_depth, defaults.h0_rule)
    quick = RUN_SIZES[DEFAULT_RUN_SIZE]  # the form starts at the quick run size; the paper's is one click away
    assert (panel.veo_epochs.value, panel.veo_eta.value) == (quick.veo_epochs, defaults.veo_eta)
    assert RUN_SIZES["paper"].veo_epochs == defaults.veo_epochs
    assert (panel.veo_lambda1.value, panel.veo_lambda2.value) == (defaults.veo_lambda1, defaults.veo_lambda2)
    assert panel.calib_size.value == FIRST_RUN_CALIB_PAIRS < defaults.calib_size  # the UI's one deliberate change


def test_settings_from_env(monkeypatch, tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setenv("QVLM_DEFAULT_MODEL", str(tmp_path / "m"))
    monkeypatch.setenv("QVLM_HUB_MODELS", "llava-hf/x,llava-hf/y")
    monkeypatch.setenv("QVLM_MAX_VARIANTS", "3")
    s = Settings.from_env()
    assert s.default_model == str(tmp_path / "m") and s.max_variants == 3
    assert any((tmp_path / "m").resolve() == r for r in s.allowed_roots)  # the default folder is allowed
    choices = s.model_choices()
    assert choices[0] == str(tmp_path / "m") and choices[-2:] == ["llava-hf/x", "llava-hf/y"]


def test_answer_cards_escape_and_mark_correctness():
    html = answers_html([AnswerCard("FP", "fp", "circle", 0.02), AnswerCard("W4A4 <b>", "variant", "triangle", 0.03)],
                        expected="circle")
    assert "W4A4 &lt;b&gt;" in html and "20 ms" in html and "30 ms" in html
    assert html.count("✓") == 1 and html.count("✗") == 1 and "reference answer" in html


def test_variants_markdown_mentions_the_bound():
    assert "up to 4" in variants_markdown([], 2**30, 4)
    md = variants_markdown([("W4A4 qvlm", 12.3, 40 * 2**20)], 2**30, 4)
    assert "1/4" in md and "40.0 MiB" in md and "12.3 s" in md


def test_a_fractional_calibration_count_reaches_the_config_and_is_refused(bundled_dir):
    """A number box with precision=0 would round 2.5 to 2 before any check: the boxes pass what was typed."""
    panel = QuantizePanel(AppState.from_settings(Settings(default_model=str(bundled_dir), preload=False)))
    with gr.Blocks():
        panel.layout()
    for box in (panel.calib_size, panel.veo_epochs):
        assert box.preprocess(2.5) == 2.5
    with pytest.raises(ValueError, match="calib_size must be a whole number"):
        config_from_form(**_form(calib_size=panel.calib_size.preprocess(2.5)))
    assert config_from_form(**_form(calib_size=panel.calib_size.preprocess(8.0))).calib_size == 8


def test_words_from_the_question_are_shown_as_text_not_markup():
    from qvlm.ui.render import vocabulary_hint_markdown
    hint = {"unknown": ["<b>zebra</b>", "<style>"], "outside": ["<i>x</i>"], "known_answers": ["circle"]}
    note = vocabulary_hint_markdown(hint, "its {n} answers are: {answers}.")
    assert "&lt;b&gt;zebra&lt;/b&gt;" in note and "&lt;style&gt;" in note and "&lt;i&gt;x&lt;/i&gt;" in note
    assert "<b>" not in note and "<style>" not in note
