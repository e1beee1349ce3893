"""Input checks behind the panels: images, config fields, settings (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from qvlm.ui import quant_bridge as qb
from qvlm.ui.images import MAX_SIDE, ImageError, load_user_image
from qvlm.ui.render import AnswerCard, answers_html, variants_markdown
from qvlm.ui.settings import EXAMPLES_DIR, Settings


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


def test_percentile_parsing():
    assert qb.parse_percentiles("1.0, 0.995 0.99;0.98") == (1.0, 0.995, 0.99, 0.98)
    for bad, msg in (("", "empty"), ("1.0, abc", "not a number"), ("1.2", "outside"), ("0.99,0.99", "twice")):
        with pytest.raises(ValueError, match=msg):
            qb.parse_percentiles(bad)


def test_h0_rule_normalization():
    assert qb.normalize_h0_rule("Mean") == "mean"
    assert qb.normalize_h0_rule("0.25") == "value:0.25"
    assert qb.normalize_h0_rule("quantile:0.75") == "quantile:0.75"
    with pytest.raises(ValueError, match="not understood"):
        qb.normalize_h0_rule("biggest")


def test_recipes_put_qvlm_first_and_hide_fp():
    names = qb.recipes()
    assert names[0] == "qvlm" and "fp" not in names and {"rtn", "qlora", "awq", "qvlm-cdm", "qvlm-veo"} <= set(names)


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
