"""The comparisons of ``qvlm/evaluation/compare.py`` in the panels, faked where they are slow: the
flipped badge and the out-of-domain hint on real answers, the token table, the disagreement finder (long job, cancel, a
click that loads a question into Ask), the vision-tower switch reaching the config and the Results
rows, the bit-width sweep and the paper's numbers, and the image-vs-text statistics.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from qvlm.evaluation.compare import SweepPoint, TokenComparison, VariantTokens
from qvlm.evaluation.modality import ModalityRow, TokenRange
from qvlm.utils.progress import check_cancel
from qvlm.quant import QuantConfig
from qvlm.ui.jobs import HEAVY_WORK
from qvlm.ui.panel_analysis import AnalysisPanel
from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.panel_quantize import QuantizePanel, config_from_form, quantized_parts, variant_label
from qvlm.ui.panel_results import ResultsPanel
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.models import MOSAIC_MODEL_NAME
from qvlm.ui.state import AppState, Variant, canonical_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLE = str(EXAMPLES_DIR / "easyvqa_test_4.png")  # a red circle


def _req(sid):
    return SimpleNamespace(session_hash=sid)


def fake_token_comparison(fp, variants, image, question, top_k=5, max_new_tokens=16):
    return TokenComparison(question, "circle", ["circle", "</s>"], [[("circle", 0.9), ("triangle", 0.1)], [("</s>", 1.0)]],
                           {label: VariantTokens("triangle", True, 0, [1.5, 0.0],
                                                 [[("triangle", 0.7), ("circle", 0.3)], [("</s>", 1.0)]])
                            for label in variants})


def fake_scan(fp, variants, samples, batch_size=32, progress=None, cancel=None):
    labels = list(variants)
    rows = []
    for i, s in enumerate(samples):
        check_cancel(cancel, "scan")
        time.sleep(0.01)
        flipped = labels[:1] if i == 1 else []
        rows.append({"index": i, "image_id": s.image_id, "split": s.split, "question": s.question, "answer": s.answer,
                     "fp_answer": s.answer, "fp_p": 0.99, "answers": {lab: s.answer for lab in labels},
                     "p": {lab: 0.99 - 0.1 * i for lab in labels}, "flipped": flipped, "drop": 0.1 * i})
        progress("disagreement scan", (i + 1) / len(samples), f"{i + 1}/{len(samples)}")
    return {"n": len(rows), "labels": labels, "rows": rows,
            "counts": {lab: sum(lab in r["flipped"] for r in rows) for lab in labels}}


def fake_sweep(fp, recipes, bits, samples, calib_size=16, progress=None, cancel=None):
    progress("bit sweep", 1.0, "done")
    rows = [SweepPoint("fp", "FP", 0.9, len(samples), 1000)]
    return rows + [SweepPoint(r, b, 0.5, len(samples), 300) for r in recipes for b in bits]


def fake_modality(handle, n_pairs=8, progress=None, cancel=None):
    progress("modality", 1.0, "layer 7")
    return [ModalityRow(k, 99.9, TokenRange(2.0, 3.0, 16 * n_pairs), TokenRange(1.0, 4.0, 14 * n_pairs)) for k in range(8)]


@pytest.fixture
def ui(bundled_dir: Path):
    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], preload=False))
    ui = SimpleNamespace(app=app, quantize=QuantizePanel(app, quantize=lambda fp, cfg, progress=None, cancel=None:
                                                          SimpleNamespace(handle=fp, config=cfg)),
                         ask=AskPanel(app, token_comparison=fake_token_comparison, disagreement_scan=fake_scan),
                         results=ResultsPanel(app, bit_sweep=fake_sweep),
                         analysis=AnalysisPanel(app, modality_stats=fake_modality), model=str(bundled_dir))
    with gr.Blocks():
        for panel in (ui.quantize, ui.analysis, ui.ask, ui.results):
            panel.layout()
    return ui


def _hold(ui, sid: str, label: str, handle, cfg: QuantConfig | None = None) -> None:
    """Put a variant in the session as a finished quantization would."""
    from qvlm.ui.state import canonical_name

    result = SimpleNamespace(handle=handle, config=cfg or QuantConfig())
    ui.app.session(_req(sid)).variants.add(Variant(key=label, label=label, base_model=canonical_name(ui.model),
                                                   result=result, nbytes=1, seconds=0.1))


@pytest.fixture(scope="module")
def shape_pushed(bundled):
    """The FP model with 'circle' made the least likely token: it never answers 'circle'."""
    model = copy.deepcopy(bundled.model)
    circle = bundled.processor.tokenizer.convert_tokens_to_ids("circle")
    with torch.no_grad():
        model.lm_head.weight[circle] *= -1.0
    return SimpleNamespace(model=model, processor=bundled.processor)


def test_a_variant_answering_otherwise_gets_the_flipped_badge(ui, shape_pushed):
    _hold(ui, "c1", "pushed", shape_pushed)
    html = ui.ask.answer_all(EXAMPLE, "what shape is present?", ui.model, _req("c1"))[ui.ask.answers]
    assert html.count("qvlm-flipped") == 1 and "flipped</span>" in html
    assert "reference answer: <b>circle</b>" in html


def test_a_question_with_unknown_words_says_what_the_model_knows(ui):
    out = ui.ask.answer_all(EXAMPLE, "how many zebras are in the picture?", ui.model, _req("c2"))
    note = out[ui.ask.note]
    assert "'zebras'" in note and "unknown token" in note
    assert "13 answers are: black, blue, brown, circle" in note
    inside = ui.ask.answer_all(EXAMPLE, "what shape is present?", ui.model, _req("c2"))[ui.ask.note]
    assert "answers are" not in inside


def test_token_comparison_shows_the_table_the_plot_and_where_they_first_differ(ui, bundled):
    _hold(ui, "c3", "W4A4 qvlm", bundled)
    out = ui.ask.compare_tokens(EXAMPLE, "what shape is present?", ui.model, _req("c3"))
    assert "first differs at step 0" in out[ui.ask.token_note] and "**flipped**" in out[ui.ask.token_note]
    table = out[ui.ask.token_table]
    assert table.count("qvlm-token-step") == 2 and "KL(FP‖W4A4 qvlm)" in table and "background:#fde2e1" in table
    assert [t.name for t in out[ui.ask.token_plot].data] == ["W4A4 qvlm"]
    bad = ui.ask.compare_tokens(None, "what shape?", ui.model, _req("c3"))
    assert set(bad) == {ui.ask.token_note} and "not run" in bad[ui.ask.token_note]


def test_finder_lists_flips_first_and_a_click_loads_the_question_into_ask(ui, bundled):
    _hold(ui, "c4", "W4A4 qvlm", bundled)
    _hold(ui, "c4", "W4A3 qvlm", bundled)
    assert ui.ask.offer_variants(ui.model, _req("c4"))[ui.ask.finder_variants]["choices"] == ["W4A4 qvlm", "W4A3 qvlm"]
    outs = list(ui.ask.find_disagreements(ui.model, ["W4A3 qvlm"], 6, _req("c4")))
    final = outs[-1]
    status = final[ui.ask.finder_status]
    assert "Scanned 6 test questions" in status and "`W4A3 qvlm`: **1** of 6" in status and "W4A4" not in status
    gallery, rows = final[ui.ask.found], final[ui.ask.found_rows]
    assert len(gallery) == len(rows) == 5  # the flipped one, then the 4 with a positive drop
    assert gallery[0][1].startswith("⚑ ") and gallery[1][1].startswith("p −0.50")
    assert all(len(caption) <= 40 for _, caption in gallery)  # one line under a thumbnail, not cut off
    assert status.count("\n| ") == 1 + len(rows) and rows[0]["question"] in status  # the full rows, in order
    loaded = ui.ask.load_found(rows, SimpleNamespace(index=0))
    path = loaded[ui.ask.image]
    assert Path(path).name == f"easyvqa_test_{rows[0]['image_id']}.png" and Path(path).is_file()
    assert loaded[ui.ask.question] == rows[0]["question"]
    html = ui.ask.answer_all(path, rows[0]["question"], ui.model, _req("c4"))[ui.ask.answers]
    assert "easy-VQA reference answer" in html  # a found test image is recognised like the examples
    assert ui.ask.load_found([], SimpleNamespace(index=0)) == {}


def test_finder_without_variants_or_with_a_bad_count_says_so(ui, bundled):
    out = list(ui.ask.find_disagreements(ui.model, [], 500, _req("c5")))
    assert len(out) == 1 and "Quantize the model first" in out[0][ui.ask.finder_status]
    _hold(ui, "c5", "W4A4 qvlm", bundled)
    out = list(ui.ask.find_disagreements(ui.model, [], 0, _req("c5")))
    assert "between 1 and" in out[0][ui.ask.finder_status]


def test_finder_cancel_keeps_the_page_and_frees_the_lock(ui, bundled):
    _hold(ui, "c6", "W4A4 qvlm", bundled)
    gen = ui.ask.find_disagreements(ui.model, [], 1000, _req("c6"))  # 10 s uncancelled: room for a loaded CI
    next(gen)
    ui.app.cancel(_req("c6"))
    outs = list(gen)
    assert "Cancelled" in outs[-1][ui.ask.finder_status] and ui.ask.found not in outs[-1]
    assert not HEAVY_WORK.locked() and ui.app.session(_req("c6")).busy is None


def test_vision_and_projector_switches_reach_the_config_label_and_results_rows(ui, bundled):
    cfg = config_from_form("W4A4", "qvlm", 8, 3, "mean", "1.0", 1, 1.0, 0.01, 1.0, False, True)
    assert (cfg.quantize_vision, cfg.quantize_projector) == (False, True)
    assert variant_label(cfg) == "W4A4 qvlm · vision FP · projector W4A4"
    assert variant_label(QuantConfig()) == "W4A4 qvlm" and quantized_parts(QuantConfig()) == "LLM + vision"
    assert variant_label(QuantConfig(), MOSAIC_MODEL_NAME) == "tiny-llava-mosaic W4A4 qvlm"  # named with its model
    assert variant_label(QuantConfig(), "/models/my-llava/") == "my-llava W4A4 qvlm"
    assert quantized_parts(cfg) == "LLM + projector"
    q = ui.quantize
    final = list(q.quantize(ui.model, "W4A4", "qvlm", 8, 3, "mean", "1.0", 1, 1.0, 0.01, 1.0, False, False,
                            request=_req("c7")))[-1]
    label = variant_label(cfg.replace(quantize_projector=False), canonical_name(ui.model))
    assert final[q.new_variant] == label and label.endswith(" W4A4 qvlm · vision FP")
    variant = ui.app.session(_req("c7")).variants.find_label(label)
    assert variant.result.config.quantize_vision is False
    table = list(ui.results.evaluate(10, ui.model, _req("c7")))[-1][ui.results.table]
    assert [row[:2] for row in table] == [["FP", "nothing (FP)"], [label, "LLM only"]]
    from qvlm.quant.integer import integer_handle
    from qvlm.quant.memory import resident_bytes
    from qvlm.ui.render import human_bytes

    # measured on the model that answered: the FP model as loaded, the variant with what its kernels hold
    assert table[0][-1] == human_bytes(resident_bytes(bundled.model))
    assert table[1][-1] == human_bytes(resident_bytes(integer_handle(variant.result.handle).model))


def test_bit_sweep_draws_accuracy_against_bits_and_checks_its_inputs(ui):
    r = ui.results
    final = list(r.sweep(["qvlm", "rtn"], ["W4A3", "W8A8"], 20, 4, ui.model, _req("c8")))[-1]
    assert "4 point(s) and FP on the same 20 test questions" in final[r.sweep_status]
    assert [row[:2] for row in final[r.sweep_table]] == [["fp", "FP"], ["qvlm", "W8A8"], ["qvlm", "W4A3"],
                                                         ["rtn", "W8A8"], ["rtn", "W4A3"]]
    assert {t.name for t in final[r.sweep_plot].data} == {"qvlm", "rtn"}
    assert "at least one recipe" in list(r.sweep([], ["W4A4"], 20, 4, ui.model, _req("c8")))[0][r.sweep_status]
    assert "between 1 and" in list(r.sweep(["qvlm"], ["W4A4"], 0, 4, ui.model, _req("c8")))[0][r.sweep_status]


def test_modality_statistics_fill_the_plot_and_table(ui):
    a = ui.analysis
    final = list(a.compute_modality(ui.model, 4, _req("c9")))[-1]
    assert "4 calibration pairs (64 image and 56 text tokens)" in final[a.modality_note]
    assert len(final[a.modality_table]) == 8 and final[a.modality_table][0][-1] == 2.0
    assert len(final[a.modality_plot].data) == 4
