"""The app follows the picked model's task (issues 11 and 15): with a mosaic model picked, the model list, the
Ask tab's examples, the disagreement finder, the evaluation and the bit-width sweep all use mosaic questions.

The mosaic model is the session's tiny real one (``tiny_mosaic_dir``: two training steps, answers are noise);
handlers are called directly with a fake request, and once through the HTTP API (gradio_client).
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

from qvlm.evaluation.compare import SweepPoint, disagreement_scan
from qvlm.data import MosaicSample, get_task
from qvlm.data.mosaic import mosaic_answers
from qvlm.models import BUNDLED_MODEL_NAME, BUNDLED_MODELS, MOSAIC_MODEL_NAME, load_vlm
from qvlm.ui import build_app
from qvlm.ui.examples import (MOSAIC_EXAMPLES, TEST_IMAGE_DIR, parse_image_file_name, reference_answer,
                              served_image_path)
from qvlm.ui.panel_ask import FINDER_SEED, AskPanel
from qvlm.ui.panel_results import SUBSET_SEED, ResultsPanel
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import AppState, Variant, canonical_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside an event warns

EASY_EXAMPLE = str(EXAMPLES_DIR / "easyvqa_test_4.png")  # a red circle


def _req(sid: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=sid)


class ScanSpy:
    """The real disagreement scan, remembering the samples it was given."""

    def __init__(self) -> None:
        self.samples: list = []

    def __call__(self, fp, variants, samples, **kwargs) -> dict:
        self.samples = list(samples)
        return disagreement_scan(fp, variants, samples, **kwargs)


def fake_sweep(fp, recipes, bits, samples, calib_size=16, progress=None, cancel=None):
    """Stands in for :func:`qvlm.evaluation.compare.bit_sweep` (quantizing is not what is tested); FP's row says its task."""
    fake_sweep.samples = list(samples)
    progress("bit sweep", 1.0, "done")
    return [SweepPoint("fp", "FP", 0.5, len(samples), 1000),
            *(SweepPoint(r, b, 0.4, len(samples), 300) for r in recipes for b in bits)]


@pytest.fixture(scope="module")
def ui(bundled_dir: Path, tiny_mosaic_dir: Path) -> SimpleNamespace:
    """Ask and Results panels over both models, the easy-VQA one preselected."""
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir, tiny_mosaic_dir], preload=False)
    app = AppState.from_settings(settings)
    spy = ScanSpy()
    ui = SimpleNamespace(app=app, spy=spy, ask=AskPanel(app, disagreement_scan=spy),
                         results=ResultsPanel(app, bit_sweep=fake_sweep), mosaic=str(tiny_mosaic_dir))
    with gr.Blocks():
        ui.ask.layout()
        ui.results.layout()
    return ui


@pytest.fixture(scope="module")
def contrary(tiny_mosaic_dir: Path) -> SimpleNamespace:
    """The tiny mosaic model with its output head negated: it answers otherwise, so the finder has flips to show."""
    fp = load_vlm(tiny_mosaic_dir)
    model = copy.deepcopy(fp.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    return SimpleNamespace(model=model, processor=fp.processor)


def _hold(ui: SimpleNamespace, sid: str, label: str, handle) -> None:
    """Put a variant of the mosaic model in the session, as a finished quantization would."""
    ui.app.session(_req(sid)).variants.add(Variant(key=label, label=label, base_model=canonical_name(ui.mosaic),
                                                   result=SimpleNamespace(handle=handle), nbytes=1, seconds=0.1))


def _visible(panel: AskPanel, outputs: dict) -> dict[str, bool]:
    """Task -> whether its example boxes are shown, from :meth:`AskPanel.offer_examples`' updates."""
    shown: dict[str, set[bool]] = {}
    for task, box in panel._example_boxes:
        shown.setdefault(task, set()).add(outputs[box]["visible"])
    assert all(len(v) == 1 for v in shown.values()), "a task's boxes must switch together"
    return {task: v.pop() for task, v in shown.items()}


# ---------------------------------------------------------------------------- the model list
def test_model_list_names_every_bundled_model_once_easy_vqa_first(monkeypatch, tiny_mosaic_dir, tmp_path):
    monkeypatch.setitem(BUNDLED_MODELS, MOSAIC_MODEL_NAME, tiny_mosaic_dir)
    roots = [tiny_mosaic_dir.parent]  # the mosaic folder is also found by the folder scan: listed once, by name
    for default in (BUNDLED_MODEL_NAME, "mosaic", str(tiny_mosaic_dir), MOSAIC_MODEL_NAME):
        s = Settings.from_env(default_model=default, allowed_roots=list(roots), hub_models=("llava-hf/x",))
        assert s.model_choices() == [BUNDLED_MODEL_NAME, MOSAIC_MODEL_NAME, "llava-hf/x"], default
        assert s.default_model == (BUNDLED_MODEL_NAME if default == BUNDLED_MODEL_NAME else MOSAIC_MODEL_NAME)
        assert s.allowed_roots == roots  # a bundled default is allowed by name, not by adding its folder
    for spelling in ("mosaic", MOSAIC_MODEL_NAME, str(tiny_mosaic_dir), f" {tiny_mosaic_dir} "):
        assert canonical_name(spelling) == MOSAIC_MODEL_NAME
    assert canonical_name("bundled") == canonical_name("easyvqa") == BUNDLED_MODEL_NAME
    assert Settings(hub_models=()).model_task("mosaic") == "mosaic"

    monkeypatch.setitem(BUNDLED_MODELS, MOSAIC_MODEL_NAME, tmp_path / "not-trained-yet")
    assert Settings(allowed_roots=[], hub_models=()).model_choices() == [BUNDLED_MODEL_NAME]
    # asked for by whoever started the app, it stays listed (its load says how to train it)
    assert Settings(default_model="mosaic", allowed_roots=[], hub_models=()).model_choices() == [
        MOSAIC_MODEL_NAME, BUNDLED_MODEL_NAME]


def test_a_models_task_is_read_from_its_folder_without_loading_it(ui, bundled_dir, tmp_path):
    settings = ui.app.settings
    assert settings.model_task(ui.mosaic) == "mosaic"
    assert settings.model_task(str(bundled_dir)) == settings.model_task("bundled") == "easy-vqa"
    assert settings.model_task("llava-hf/llava-1.5-7b-hf") == "easy-vqa"  # hub ids: easy-VQA
    assert settings.model_task(str(tmp_path)) == "easy-vqa"  # outside the allowed folders: not read


# ---------------------------------------------------------------------------- Ask: examples and hint
def test_the_ask_tabs_examples_switch_with_the_model(ui, bundled_dir, tiny_mosaic_dir):
    ask = ui.ask
    assert _visible(ask, ask.offer_examples(ui.mosaic)) == {"easy-vqa": False, "mosaic": True}
    assert _visible(ask, ask.offer_examples(str(bundled_dir))) == {"easy-vqa": True, "mosaic": False}
    assert _visible(ask, ask.offer_examples("llava-hf/llava-1.5-7b-hf")) == {"easy-vqa": True, "mosaic": False}
    assert {task: box.visible for task, box in ask._example_boxes} == {"easy-vqa": True, "mosaic": False}

    mosaic = ask.examples["mosaic"]
    assert len(mosaic.images) == MOSAIC_EXAMPLES and len(mosaic.questions) == 5
    for path, question in mosaic.images:  # test mosaics, each with its own test question and answer
        with Image.open(path) as img:
            assert Path(path).parent == TEST_IMAGE_DIR and img.size == (128, 128)
        task, answer = reference_answer(path, question)
        assert task == "mosaic" and answer in mosaic_answers()
    assert {parse_image_file_name(p)[0] for p, _ in ask.examples["easy-vqa"].images} == {"easy-vqa"}

    # a page whose preselected model is the mosaic model shows the mosaic examples from the start
    panel = AskPanel(AppState.from_settings(Settings(default_model=str(tiny_mosaic_dir),
                                                     allowed_roots=[tiny_mosaic_dir], preload=False)))
    with gr.Blocks():
        panel.layout()
    assert {task: box.visible for task, box in panel._example_boxes} == {"easy-vqa": False, "mosaic": True}


def test_a_mosaic_example_is_answered_with_the_mosaic_reference_answer(ui):
    path, question = ui.ask.examples["mosaic"].images[0]
    _, answer = reference_answer(path, question)
    html = ui.ask.answer_all(path, question, ui.mosaic, _req("m1"))[ui.ask.answers]
    assert "FP · full precision" in html and f"mosaic reference answer: <b>{answer}</b>" in html


def test_the_out_of_domain_hint_names_the_mosaic_answer_set(ui, bundled_dir):
    path, _ = ui.ask.examples["mosaic"].images[0]
    note = ui.ask.answer_all(path, "how many zebras are there?", ui.mosaic, _req("m2"))[ui.ask.note]
    assert "'zebras'" in note and "mosaic task" in note
    assert f"{len(mosaic_answers())} answers are: {', '.join(mosaic_answers())}." in note
    assert "zero" in mosaic_answers() and "yes" in mosaic_answers()
    easy = ui.ask.answer_all(EASY_EXAMPLE, "how many zebras are there?", str(bundled_dir), _req("m2"))[ui.ask.note]
    assert "13 answers are: black, blue" in easy and "mosaic" not in easy


# ---------------------------------------------------------------------------- Ask: the disagreement finder
def test_the_finder_scans_mosaic_questions_and_a_found_mosaic_loads_with_its_answer(ui, contrary):
    _hold(ui, "m3", "contrary", contrary)
    final = list(ui.ask.find_disagreements(ui.mosaic, [], 12, _req("m3")))[-1]
    status = final[ui.ask.finder_status]
    assert "Scanning 12 mosaic test questions" in status and "Scanned 12 test questions" in status
    assert ui.spy.samples == get_task("mosaic").evaluation_subset(12, seed=FINDER_SEED)
    assert all(isinstance(s, MosaicSample) for s in ui.spy.samples)
    gallery, rows = final[ui.ask.found], final[ui.ask.found_rows]
    assert rows and len(gallery) == len(rows)
    by_question = {(s.image_id, s.question): s for s in ui.spy.samples}
    for (thumb, _), row in zip(gallery, rows, strict=True):
        sample = by_question[(row["image_id"], row["question"])]
        cells = "-".join(str(i) for i in sample.cells)
        assert Path(thumb).name == f"mosaic_test_{cells}.png" and thumb == row["path"]
        with Image.open(thumb) as img:
            assert img.convert("RGB").tobytes() == sample.load_image().tobytes()

    loaded = ui.ask.load_found(rows, SimpleNamespace(index=0))
    sample = by_question[(rows[0]["image_id"], rows[0]["question"])]
    assert loaded[ui.ask.question] == sample.question
    html = ui.ask.answer_all(loaded[ui.ask.image], loaded[ui.ask.question], ui.mosaic, _req("m3"))[ui.ask.answers]
    assert f"mosaic reference answer: <b>{sample.answer}</b>" in html and "contrary" in html


def test_the_finders_question_count_is_checked_against_the_models_own_test_split(ui, contrary, bundled_dir):
    _hold(ui, "m4", "contrary", contrary)
    size = get_task("mosaic").test_size()
    assert size < get_task("easy-vqa").test_size()
    out = list(ui.ask.find_disagreements(ui.mosaic, [], size + 1, _req("m4")))
    assert len(out) == 1 and f"between 1 and {size} test questions to scan" in out[0][ui.ask.finder_status]


def test_served_test_images_round_trip_to_their_reference_answers():
    for task in ("mosaic", "easy-vqa"):
        sample = get_task(task).evaluation_subset(5, seed=3)[1]
        path = served_image_path(task, sample)
        assert parse_image_file_name(path) == (task, "test", sample.image_id)
        assert reference_answer(path, sample.question.upper() + "?") == (task, sample.answer)
        assert reference_answer(path, "is this a question of the test split?") is None
    cells = get_task("mosaic").evaluation_subset(1)[0].cells
    assert Path(served_image_path("mosaic", get_task("mosaic").evaluation_subset(1)[0])).name == \
        "mosaic_test_" + "-".join(map(str, cells)) + ".png"
    assert reference_answer("/uploads/holiday.png", "how many circles are there?") is None
    assert reference_answer(None, "how many circles are there?") is None


# ---------------------------------------------------------------------------- Results
def test_evaluation_on_the_mosaic_model_uses_mosaic_questions(ui):
    r = ui.results
    outs = list(r.evaluate(8, ui.mosaic, _req("m5")))
    final = outs[-1]
    assert "Evaluating on 8 mosaic test questions" in final[r.status]
    assert "1 model(s) evaluated on the same 8 test questions" in final[r.status]
    result = ui.app.session(_req("m5")).fp_evals[(canonical_name(ui.mosaic), 8, SUBSET_SEED)]
    expected = get_task("mosaic").evaluation_subset(8, seed=SUBSET_SEED)
    assert [(p["image_id"], p["question"]) for p in result.predictions] == [(s.image_id, s.question) for s in expected]
    (row,) = final[r.table]
    per_type = row[4]
    assert set(result.per_type) <= set(get_task("mosaic").question_types)
    assert all(t in per_type for t in result.per_type) and "yes/no" not in per_type
    assert final[r.accuracy].layout.title.text == "mosaic accuracy"
    too_many = list(r.evaluate(get_task("mosaic").test_size() + 1, ui.mosaic, _req("m5")))
    assert f"between 1 and {get_task('mosaic').test_size()} test questions" in too_many[-1][r.status]


def test_the_bit_sweep_on_the_mosaic_model_uses_mosaic_questions(ui):
    r = ui.results
    final = list(r.sweep(["rtn"], ["W8A8"], 10, 4, ui.mosaic, _req("m6")))[-1]
    assert "Sweeping 1 point(s) on 10 mosaic test questions" in final[r.sweep_status]
    assert fake_sweep.samples == get_task("mosaic").evaluation_subset(10, seed=SUBSET_SEED)
    assert final[r.sweep_plot].layout.title.text.startswith("mosaic accuracy vs bit-width")
    size = get_task("mosaic").test_size()
    refused = list(r.sweep(["rtn"], ["W8A8"], size + 1, 4, ui.mosaic, _req("m6")))
    assert len(refused) == 1 and f"between 1 and {size}" in refused[0][r.sweep_status]


# ---------------------------------------------------------------------------- over HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ask_and_evaluate_the_mosaic_model_over_http(bundled_dir, tiny_mosaic_dir, ui):
    from gradio_client import Client, handle_file

    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir, tiny_mosaic_dir], hub_models=(),
                        preload=False)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=settings.concurrency)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        path, question = ui.ask.examples["mosaic"].images[1]
        _, answer = reference_answer(path, question)
        html, _ = client.predict(handle_file(path), question, str(tiny_mosaic_dir), api_name="/ask")
        assert f"mosaic reference answer: <b>{answer}</b>" in html  # the upload keeps its name
        status, *_ = client.predict(10, str(tiny_mosaic_dir), api_name="/evaluate")  # the slider's minimum
        assert "Evaluating on 10 mosaic test questions" in status and "evaluated on the same 10" in status
    finally:
        demo.close()
