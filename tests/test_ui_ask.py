"""Ask panel and model choice: each bad input gets its message, and nothing computed is lost.

The handlers are called directly with a fake request (what Gradio passes carries a
``session_hash``); gr.Warning outside an event only logs, so the messages are asserted on
the status text each handler returns alongside the toast.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from qvlm.ui.callbacks import Controller
from qvlm.ui.settings import EXAMPLES_DIR, Settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside an event warns


@pytest.fixture(scope="module")
def ctl(bundled_dir: Path, tmp_path_factory) -> Controller:
    allowed = tmp_path_factory.mktemp("allowed")
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir, allowed], preload=False)
    return Controller(settings)


def _req(sid: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=sid)


def _skipped(value) -> bool:
    """gr.skip() is an update dict with no keys but __type__."""
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


EXAMPLE = str(EXAMPLES_DIR / "easyvqa_test_4.png")  # a red circle


def test_fp_answer_with_note_before_any_quantization(ctl, bundled_dir):
    html, note = ctl.ask(EXAMPLE, "what shape is present?", str(bundled_dir), _req("ask-1"))
    assert "FP · full precision" in html and "ms" in html
    assert "No quantized variant yet" in note
    assert "reference answer: <b>circle</b>" in html  # example image + test question: the dataset's answer
    # the image may also arrive un-preprocessed, as Gradio's FileData dict
    html2, _ = ctl.ask({"path": EXAMPLE, "orig_name": "x.png"}, "what shape is present?", str(bundled_dir), _req("ask-1"))
    assert "FP · full precision" in html2


@pytest.mark.parametrize(
    "image, question, message",
    [
        (None, "what shape is present?", "add an image"),
        (EXAMPLE, "", "type a question"),
        (EXAMPLE, "   \n ", "type a question"),
        (EXAMPLE, "why? " * 200, "too long"),
    ],
)
def test_bad_ask_inputs_keep_previous_answers(ctl, bundled_dir, image, question, message):
    answers, note = ctl.ask(image, question, str(bundled_dir), _req("ask-2"))
    assert _skipped(answers)  # the answers already on screen stay
    assert message in note and note.startswith("⚠")


def test_not_an_image_file(ctl, bundled_dir, tmp_path):
    bogus = tmp_path / "photo.png"
    bogus.write_text("this is text with an image extension")
    answers, note = ctl.ask(str(bogus), "what shape is present?", str(bundled_dir), _req("ask-3"))
    assert _skipped(answers) and "not an image" in note


def test_very_large_image_is_downscaled_and_answered(ctl, bundled_dir, tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), "red").save(big, quality=50)
    html, note = ctl.ask(str(big), "what color is the shape?", str(bundled_dir), _req("ask-4"))
    assert "FP · full precision" in html and "downscaled" in note


def test_model_outside_allowed_folders(ctl, tmp_path):
    answers, note = ctl.ask(EXAMPLE, "what shape is present?", str(tmp_path), _req("ask-5"))
    assert _skipped(answers) and "outside the folders this app may read" in note


def test_non_llava_model_is_refused(ctl):
    folder = ctl.settings.allowed_roots[1] / "a-llama"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    _, note = ctl.ask(EXAMPLE, "what shape is present?", str(folder), _req("ask-6"))
    assert "not a LLaVA-family" in note


def test_unknown_or_unreachable_hub_id(ctl, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, note = ctl.ask(EXAMPLE, "what shape is present?", "nobody-here/not-a-model-xyz", _req("ask-7"))
    assert "hub" in note and ("unknown" in note or "unreachable" in note)


def test_model_too_big_for_memory(bundled_dir):
    tight = Controller(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir],
                                memory_budget_bytes=1024, preload=False))
    _, note = tight.ask(EXAMPLE, "what shape is present?", str(bundled_dir), _req("ask-8"))
    assert "needs about" in note and "is free here" in note
