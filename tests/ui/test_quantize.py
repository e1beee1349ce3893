"""The panels on a REAL quantization of the bundled model (the core, not a stand-in).

One small W4A4 Q-VLM run is shared by the module (calibration pairs, VEO epochs and the
percentile grid are cut down so it takes seconds, not minutes); every panel's main callback is
then checked on its result: the streamed stages, the Analysis figures built from what the
core returned, side-by-side answers, accuracy and packed weight memory, and a cancel that
really interrupts the core.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from qvlm.models import BUNDLED_MODEL_DIR
from qvlm.evaluation.analysis import veo_outcome
from qvlm.ui.jobs import HEAVY_WORK
from qvlm.ui.panel_analysis import AnalysisPanel
from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.panel_quantize import QuantizePanel, model_short_name
from qvlm.ui.panel_results import ResultsPanel
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import AppState, canonical_name

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# model, bits, recipe, calib, depth, h0, percentiles, VEO epochs, eta, lambda1, lambda2
SMALL_RUN = ["W4A4", "qvlm", 4, 3, "mean", "1.0, 0.99, 0.98", 2, 1.0, 0.01, 1.0]
LABEL = f"{model_short_name(canonical_name(os.environ.get('QVLM_TEST_MODEL', str(BUNDLED_MODEL_DIR))))} W4A4 qvlm"


def _req(sid: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=sid)


@pytest.fixture(scope="module")
def run(bundled_dir: Path):
    """The four panels as build_app makes them (the core's own quantize and DED sweep), after one real run."""
    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], preload=False))
    ui = SimpleNamespace(app=app, quantize=QuantizePanel(app), analysis=AnalysisPanel(app), ask=AskPanel(app),
                         results=ResultsPanel(app))
    with gr.Blocks():
        for panel in (ui.quantize, ui.analysis, ui.ask, ui.results):
            panel.layout()
    start = time.monotonic()
    outs = list(ui.quantize.quantize(str(bundled_dir), *SMALL_RUN, request=_req("real")))
    return SimpleNamespace(ui=ui, app=app, outs=outs, seconds=time.monotonic() - start, model=str(bundled_dir))


def test_real_run_streams_every_stage_and_holds_the_variant(run):
    final = run.outs[-1][run.ui.quantize.status]
    assert "ready in" in final, final
    for stage in ("calibration", "init ranges", "VEO", "entropy D(k,k+1)", "block-wise percentile search"):
        assert stage in final
    assert len(run.outs) >= 3  # streamed
    session = run.app.session(_req("real"))
    assert session.variants.labels() == [LABEL]
    variant = session.variants.find_label(LABEL)
    assert variant.result.config.w_bits == 4 and variant.result.config.calib_size == 4


def test_analysis_figures_come_from_the_real_result(run):
    a = run.ui.analysis
    shown = a.show_overview(LABEL, _req("real"))
    info, partition, errors, veo = shown[a.info], shown[a.partition], shown[a.errors], shown[a.veo]
    r = run.app.session(_req("real")).variants.find_label(LABEL).result
    assert f"{len(r.blocks)} blocks" in info and f"({len(r.blocks)} blocks)" in partition.layout.title.text
    block_traces = [t for t in partition.data if (t.name or "").startswith("block")]
    assert [list(t.x) for t in block_traces] == [list(b) for b in r.blocks]
    d_bars = next(t for t in partition.data if t.name == "D(k,k+1)")
    assert list(d_bars.y) == pytest.approx(list(r.entropies))
    assert any((t.name or "").startswith("h0") for t in partition.data)
    assert len(errors.data) >= 1 and len(errors.data[0].x) == len(r.layer_errors)
    assert len(veo.data) >= 1 and len(veo.data[0].x) == len(r.veo_losses)
    # the VEO title and the text under it give the held-out error change in the same words
    phrase = veo_outcome(r.veo_holdout).error_phrase
    assert phrase in veo.layout.title.text and phrase in shown[a.veo_note]
    for lead in (a.partition_lead, a.error_lead, a.veo_lead):
        assert shown[lead] and shown[lead].count(". ") <= 1  # one plain sentence (two for the error view)


def test_ded_sweep_on_the_real_result(run):
    a = run.ui.analysis
    final = list(a.compute_ded(LABEL, 2, 2, _req("real")))[-1]
    note, ded_fig, qerr_fig = final[a.ded_note], final[a.ded_plot], final[a.qerr_plot]
    assert "Done in" in note, note
    assert "R² =" in ded_fig.layout.annotations[0].text and len(ded_fig.data[0].x) == 2
    assert "R² =" in qerr_fig.layout.annotations[0].text


def test_fp_and_quantized_answer_side_by_side(run):
    html = run.ui.ask.answer_all(str(EXAMPLES_DIR / "easyvqa_test_11.png"), "what is the black shape?", run.model,
                                 _req("real"))[run.ui.ask.answers]
    assert "FP · full precision" in html and LABEL in html and html.count(" ms<") == 2
    assert "reference answer: <b>rectangle</b>" in html


def test_results_show_accuracy_and_packed_memory(run):
    r = run.ui.results
    final = list(r.evaluate(20, run.model, _req("real")))[-1]
    status, table, mem = final[r.status], final[r.table], final[r.memory]
    assert "2 model(s) evaluated" in status
    fp_row, q_row = table
    assert fp_row[0] == "FP" and q_row[0] == LABEL
    assert q_row[-2].endswith("x") and float(q_row[-2][:-1]) > 2.5  # W4 packs weights > 2.5x smaller than FP16
    assert q_row[-1].endswith("iB") and fp_row[-1].endswith("iB")  # held while answering, measured
    assert [t.name for t in mem.data] == ["FP16", "quantized (packed)"] and list(mem.data[0].x) == [LABEL]


def test_cancel_interrupts_the_real_core(run):
    q = run.ui.quantize
    gen = q.quantize(run.model, "W8A8", "qvlm", *SMALL_RUN[2:], request=_req("real"))
    statuses = []
    canceller = None
    for out in gen:
        statuses.append(out[q.status])
        if canceller is None and "calibration" in out[q.status]:
            canceller = threading.Timer(0.1, run.app.cancel, args=(_req("real"),))
            canceller.start()
    assert "Cancelled" in statuses[-1]
    assert run.app.session(_req("real")).variants.labels() == [LABEL]  # nothing lost, nothing half-added
    assert not HEAVY_WORK.locked()


# --- presets, vision bits, run size: plain config, no model ------------------------------------------------
FORM = ["W4A4", "qvlm", 16, 3, "mean", "1.0, 0.995, 0.99, 0.985, 0.98", 2, 1.0, 0.01, 1.0]


def test_the_preset_line_says_where_the_form_departs_from_its_preset():
    from qvlm.quant import PRESETS
    from qvlm.ui.panel_quantize import config_from_form, preset_line

    default = config_from_form(*FORM)
    assert preset_line(default).startswith(f"Preset: {default.preset} · differs in: calib_size = 16 (preset: 64)")
    for name in PRESETS:
        cfg = config_from_form(*FORM, preset=name)
        assert cfg.preset == name and preset_line(cfg).startswith(f"Preset: {name}")
    token = config_from_form(*FORM).replace(act_granularity_vision="token")
    assert "act_granularity_vision = token (preset: channel)" in preset_line(token)


def test_vision_bits_set_the_vision_tower_and_show_in_the_label():
    from qvlm.quant import PRESET_NAMES
    from qvlm.ui.panel_quantize import SAME_BITS, config_from_form, variant_label

    same = config_from_form(*FORM, vision_bits=SAME_BITS)
    assert (same.vision_w_bits, same.vision_a_bits) == (None, None) and variant_label(same, "m") == "m W4A4 qvlm"
    own = config_from_form(*FORM, vision_bits="W4A8")
    assert own.tower_bits("vision") == (4, 8) and variant_label(own, "m") == "m W4A4 (vision W4A8) qvlm"
    other = next(p for p in PRESET_NAMES if p != same.preset)
    assert variant_label(config_from_form(*FORM, preset=other), "m") == f"m W4A4 qvlm · {other} preset"
    with pytest.raises(ValueError, match="W4A4"):
        config_from_form(*FORM, vision_bits="eight")


def test_expected_time_comes_from_measurements_or_says_there_is_none(tmp_path):
    from qvlm.ui.run_size import RUN_SIZES, expected_time, read_costs

    costs = {"machine": "test CPU", "threads": 2, "date": "2026-01-01", "runs": [
        {"model": "m", "recipe": "qvlm", "run_size": "quick", "calib_size": 16, "veo_epochs": 2,
         "timings": {"calibration": 1.0, "init": 2.0, "veo": 4.0, "measure": 1.0, "total": 8.2}}]}
    assert "Expected time: 8 s of quantization (measured: test CPU" in expected_time("m", "qvlm", "quick", 16, 2, costs)
    # twice the pairs and twice the epochs: 4 s of other stages x 2 + 4 s of VEO x 4
    assert "about 24 s" in expected_time("m", "qvlm", "quick", 32, 4, costs)
    assert "no measurement yet" in expected_time("m", "rtn", "quick", 16, 2, costs)
    assert "no measurement yet" in expected_time("other", "qvlm", "paper", 64, 10, {})
    assert read_costs(tmp_path / "absent.json") == {}
    assert RUN_SIZES["paper"].calib_size == 64 and RUN_SIZES["paper"].veo_epochs == 10


def test_the_form_preview_and_the_run_size_update_the_form(bundled_dir):
    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], preload=False))
    panel = QuantizePanel(app)
    with gr.Blocks():
        panel.layout()
    shown = panel.describe_form(str(bundled_dir), *FORM, True, False, "recommended", "same", "quick")
    assert shown[panel.preset_line].startswith("Preset: recommended") and "Expected time" in shown[panel.estimate]
    bad = panel.describe_form(str(bundled_dir), "W9A9", *FORM[1:], True, False, "recommended", "same", "quick")
    assert "bits" in bad[panel.preset_line]
    assert panel.choose_run_size("paper") == {panel.calib_size: 64, panel.veo_epochs: 10}
