"""Ask panel and model choice: each bad input gets its message, and nothing computed is lost.

The handlers are called directly with a fake request (what Gradio passes carries a
``session_hash``); gr.Warning outside an event only logs, so the messages are asserted on
the status text each handler returns alongside the toast.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import gradio as gr
from transformers import LlamaConfig

from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import AppState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside an event warns


def _ask_panel(settings: Settings) -> AskPanel:
    panel = AskPanel(AppState.from_settings(settings))
    with gr.Blocks():
        panel.layout()
    return panel


@pytest.fixture(scope="module")
def ask(bundled_dir: Path, tmp_path_factory) -> AskPanel:
    allowed = tmp_path_factory.mktemp("allowed")
    return _ask_panel(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir, allowed], preload=False))


def _req(sid: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=sid)


def _answer(panel: AskPanel, *args) -> tuple[str | None, str]:
    """(answers HTML, or None when the answers on screen are left as they were; the note)."""
    out = panel.answer_all(*args)
    return out.get(panel.answers), out[panel.note]


EXAMPLE = str(EXAMPLES_DIR / "easyvqa_test_4.png")  # a red circle


def test_fp_answer_with_note_before_any_quantization(ask, bundled_dir):
    html, note = _answer(ask, EXAMPLE, "what shape is present?", str(bundled_dir), _req("ask-1"))
    assert "FP · full precision" in html and "ms" in html
    assert "No quantized variant yet" in note
    assert "reference answer: <b>circle</b>" in html  # example image + test question: the dataset's answer
    # the image may also arrive un-preprocessed, as Gradio's FileData dict
    html2, _ = _answer(ask, {"path": EXAMPLE, "orig_name": "x.png"}, "what shape is present?", str(bundled_dir),
                       _req("ask-1"))
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
def test_bad_ask_inputs_keep_previous_answers(ask, bundled_dir, image, question, message):
    answers, note = _answer(ask, image, question, str(bundled_dir), _req("ask-2"))
    assert answers is None  # the answers already on screen stay
    assert message in note and note.startswith("⚠")


def test_not_an_image_file(ask, bundled_dir, tmp_path):
    bogus = tmp_path / "photo.png"
    bogus.write_text("this is text with an image extension")
    answers, note = _answer(ask, str(bogus), "what shape is present?", str(bundled_dir), _req("ask-3"))
    assert answers is None and "not an image" in note


def test_very_large_image_is_downscaled_and_answered(ask, bundled_dir, tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), "red").save(big, quality=50)
    html, note = _answer(ask, str(big), "what color is the shape?", str(bundled_dir), _req("ask-4"))
    assert "FP · full precision" in html and "downscaled" in note


def test_model_outside_allowed_folders(ask, tmp_path):
    answers, note = _answer(ask, EXAMPLE, "what shape is present?", str(tmp_path), _req("ask-5"))
    assert answers is None and "outside the folders this app may read" in note


def test_non_llava_model_is_refused(ask):
    folder = ask.app.settings.allowed_roots[1] / "a-llama"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    _, note = _answer(ask, EXAMPLE, "what shape is present?", str(folder), _req("ask-6"))
    assert "not a LLaVA-family" in note


def test_unknown_or_unreachable_hub_id(ask, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, note = _answer(ask, EXAMPLE, "what shape is present?", "nobody-here/not-a-model-xyz", _req("ask-7"))
    assert "hub" in note and ("unknown" in note or "unreachable" in note)


def test_model_too_big_for_memory(bundled_dir):
    tight = _ask_panel(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir],
                                memory_budget_bytes=1024, preload=False))
    _, note = _answer(tight, EXAMPLE, "what shape is present?", str(bundled_dir), _req("ask-8"))
    assert "needs about" in note and "is free here" in note
