"""Long-job handling with a stand-in for the core: streaming, cancel, the cross-session lock, LRU
eviction with a message, DED computed once then browsed. Fast and deterministic; the real core is
exercised in tests/ui/test_quantize.py and the browser test.

The stand-ins are passed in where the panels are built (``QuantizePanel(app, quantize=...)``,
``AnalysisPanel(app, ded_sweep=..., dependency_diagnostics=...)``), as the app passes the core's functions.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from qvlm.evaluation.analysis import DEDAnalysis, PairSummary
from qvlm.utils.stats import linear_fit
from tests.run_records import ded_point
from qvlm.utils.progress import Cancelled, check_cancel
from qvlm.ui.jobs import HEAVY_WORK
from qvlm.ui.panel_analysis import AnalysisPanel
from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.panel_quantize import QuantizePanel, model_short_name
from qvlm.ui.panel_results import ResultsPanel
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import AppState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def L(rest: str) -> str:
    """A variant's label as the Quantize tab makes it: the bundled model's name, then bits and recipe."""
    from qvlm.models import BUNDLED_MODEL_DIR
    from qvlm.ui.state import canonical_name
    return f"{model_short_name(canonical_name(os.environ.get('QVLM_TEST_MODEL', str(BUNDLED_MODEL_DIR))))} {rest}"


def fake_quantize(fp, cfg, progress=None, cancel=None, delay=0.05, veo_gate=None):
    """The core's quantize() in shape only: four stages of progress, cancellable, a result on the FP model.

    ``veo_gate``: when given, the run holds halfway through VEO until the gate opens (or a cancel
    comes), so a test can see a running stage, or cancel inside one, without racing the clock.
    """
    for stage, steps in (("calibration", 2), ("veo", 4), ("entropy", 1), ("search", 3)):
        for i in range(steps):
            check_cancel(cancel, stage)
            progress(stage, (i + 1) / steps, f"{stage} {i + 1}/{steps}")
            while stage == "veo" and i == 1 and veo_gate is not None and not veo_gate.wait(0.01):
                check_cancel(cancel, stage)
            time.sleep(delay)
    return SimpleNamespace(handle=fp, config=cfg, entropies=[0.5] * 7, h0=0.5, blocks=[[0, 1, 2], [3, 4], [5, 6, 7]],
                           percentiles={k: 1.0 for k in range(8)}, layer_errors=[], veo_losses=[], veo_holdout=[],
                           timings={}, search=[])


@pytest.fixture
def ui(bundled_dir: Path) -> SimpleNamespace:
    """The four panels on one app state, laid out as build_app does, with the core's long work faked."""
    sweeps: list[int] = []
    diagnostics: list[int] = []

    def fake_ded_sweep(fp, result, layers=None, n_samples=None, depth=2, progress=None, cancel=None):
        sweeps.append(n_samples)
        progress("ded", 1.0, "layer 6")
        pts = [ded_point(0.1 * i, 0.2 * i + 0.01, 0.05 * i * i, i) for i in range(n_samples)]
        fit = linear_fit([p.entropy for p in pts], [p.ded for p in pts])
        qerr_fit = linear_fit([p.qerr for p in pts], [p.ded for p in pts])
        return [DEDAnalysis(layer=k, block=[k, k + 1], points=pts, fit=fit, qerr_fit=qerr_fit, n_samples=n_samples,
                            r2_chance=0.9) for k in range(7)]

    def fake_dependency_diagnostics(fp, result, n_samples=None, progress=None, cancel=None):
        diagnostics.append(n_samples)
        pairs = fake_ded_sweep(fp, result, n_samples=n_samples, progress=progress, cancel=cancel)
        rows = [{"layer": p.layer, "block": p.block, "n": n_samples, "r2_entropy": 0.5, "r2_qerr": 0.2,
                 "r2_chance": 0.771, "interaction_share": 0.02 * p.layer, "mean_ded": 0.1, "ded_relative": None,
                 "controllable_share": 0.25, "zero_ded_fraction": 0.75, "joint_equals_greedy": p.layer != 6,
                 "gain": 1.25, "branch_response": 0.5} for p in pairs]
        verdict = f"Made-up verdict for {n_samples} samples: pair L6–L7 interacts."
        return SimpleNamespace(pairs=pairs, verdict=verdict, summaries=[PairSummary.from_dict(r) for r in rows],
                               to_dict=lambda: {"pairs": rows, "verdict": verdict})

    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], max_variants=2,
                                          preload=False))
    veo_gate = threading.Event()
    veo_gate.set()  # open unless a test closes it to hold a run inside VEO
    ui = SimpleNamespace(app=app, veo_gate=veo_gate,
                         quantize=QuantizePanel(app, quantize=functools.partial(fake_quantize, veo_gate=veo_gate)),
                         analysis=AnalysisPanel(app, ded_sweep=fake_ded_sweep,
                                                dependency_diagnostics=fake_dependency_diagnostics),
                         ask=AskPanel(app), results=ResultsPanel(app), sweeps=sweeps, diagnostics=diagnostics)
    with gr.Blocks():
        for panel in (ui.quantize, ui.analysis, ui.ask, ui.results):
            panel.layout()
    return ui


def _args(bits="W4A4", recipe="qvlm", calib=8):
    return [bits, recipe, calib, 3, "mean", "1.0, 0.99", 1, 1.0, 0.01, 1.0]


def _req(sid):
    return SimpleNamespace(session_hash=sid)


def _until_veo_is_running(gen, status):
    """Drive the handler until its status shows VEO running at the point where the fake run holds (halfway): the
    statuses seen. Why halfway and not the first VEO line: on a slow machine a poll can land on step 1 of 4 (25%)
    before the run reaches the gate."""
    seen = []
    while not any(line.startswith("- ▶ **VEO") and " 50%" in line for line in (seen[-1] if seen else "").splitlines()):
        seen.append(next(gen)[status])
    return seen


def test_progress_streams_stage_by_stage_then_the_variant_appears(ui, bundled_dir):
    q, a = ui.quantize, ui.analysis
    ui.veo_gate.clear()
    gen = q.quantize(str(bundled_dir), *_args(), request=_req("j1"))
    running = _until_veo_is_running(gen, q.status)  # a running stage is shown as such, with its fraction
    assert " 50%" in next(line for line in running[-1].splitlines() if "VEO" in line)
    ui.veo_gate.set()
    outs = list(gen)
    statuses = running + [o[q.status] for o in outs]
    assert len(statuses) >= 3  # streamed, not one final update
    assert any("**calibration" in s for s in statuses[:-1])
    assert "✓ **VEO" in statuses[-1] and "✓ **block-wise percentile search" in statuses[-1]
    assert L("W4A4 qvlm") in statuses[-1] and "ready in" in statuses[-1]
    assert "(8 calibration pairs)" in statuses[0]  # the form's setting reached the config
    assert "1/2" in outs[-1][q.held] and outs[-1][q.new_variant] == L("W4A4 qvlm")
    # the Analysis tab then opens the new variant, its layer slider bounded by the model's decoder pairs
    opened = a.select_variant(outs[-1][q.new_variant], _req("j1"))
    assert opened[a.variant]["value"] == L("W4A4 qvlm") and L("W4A4 qvlm") in str(opened[a.variant]["choices"])
    assert opened[a.layer]["maximum"] == 6


def test_bad_config_is_reported_before_anything_runs(ui, bundled_dir):
    q = ui.quantize
    outs = list(q.quantize(str(bundled_dir), *_args(calib=0), request=_req("j2")))
    assert len(outs) == 1 and "calib_size" in outs[0][q.status] and outs[0][q.status].startswith("⚠")
    assert outs[0][q.new_variant] is None and q.held not in outs[0]  # nothing else on the page changes
    assert ui.app.session(_req("j2")).busy is None


def test_cancel_mid_run_keeps_held_variants_and_the_analysis_selection(ui, bundled_dir):
    q = ui.quantize
    list(q.quantize(str(bundled_dir), *_args("W8A8", "rtn"), request=_req("j3")))
    ui.veo_gate.clear()
    gen = q.quantize(str(bundled_dir), *_args(), request=_req("j3"))
    _until_veo_is_running(gen, q.status)
    ui.app.cancel(_req("j3"))
    outs = list(gen)
    assert "Cancelled" in outs[-1][q.status] and "still here" in outs[-1][q.status]
    assert L("W8A8 rtn") in outs[-1][q.held]
    assert outs[-1][q.new_variant] is None and ui.analysis.select_variant(None, _req("j3")) == {}
    assert ui.app.session(_req("j3")).variants.labels() == [L("W8A8 rtn")]
    assert ui.app.session(_req("j3")).busy is None and not HEAVY_WORK.locked()


def test_lru_eviction_is_announced(ui, bundled_dir):
    q = ui.quantize
    for bits in ("W8A8", "W6A6"):
        list(q.quantize(str(bundled_dir), *_args(bits), request=_req("j4")))
    final = list(q.quantize(str(bundled_dir), *_args("W4A4"), request=_req("j4")))[-1]
    assert f"dropped the least recently used variant '{L('W8A8 qvlm')}'" in final[q.status]
    assert ui.app.session(_req("j4")).variants.labels() == [L("W6A6 qvlm"), L("W4A4 qvlm")]
    # the Analysis panel asked for the dropped variant says so instead of failing
    assert "no longer held" in ui.analysis.show_overview(L("W8A8 qvlm"), _req("j4"))[ui.analysis.info]


def test_second_session_waits_with_a_message(ui, bundled_dir):
    q = ui.quantize
    first = q.quantize(str(bundled_dir), *_args(), request=_req("a"))
    next(first)  # session a now holds the lock
    assert HEAVY_WORK.locked()
    second = q.quantize(str(bundled_dir), *_args("W8A8"), request=_req("b"))
    waiting = next(second)[q.status]
    assert f"Waiting: another session is running a quantization ({L('W4A4 qvlm')})" in waiting
    list(first)  # a finishes and releases the lock
    outs = list(second)
    assert L("W8A8 qvlm") in outs[-1][q.status] and "ready in" in outs[-1][q.status]


def test_cancel_while_waiting_for_another_session_starts_nothing(ui, bundled_dir):
    q = ui.quantize
    first = q.quantize(str(bundled_dir), *_args(), request=_req("w1"))
    next(first)
    second = q.quantize(str(bundled_dir), *_args("W8A8"), request=_req("w2"))
    next(second)  # waiting
    ui.app.cancel(_req("w2"))
    outs = list(second)
    assert "Cancelled while waiting; nothing was started" in outs[-1][q.status]
    assert ui.app.session(_req("w2")).busy is None and ui.app.session(_req("w2")).variants.labels() == []
    list(first)
    assert not HEAVY_WORK.locked()


def test_same_session_cannot_start_twice(ui, bundled_dir):
    q = ui.quantize
    first = q.quantize(str(bundled_dir), *_args(), request=_req("c"))
    next(first)
    again = list(q.quantize(str(bundled_dir), *_args("W8A8"), request=_req("c")))
    assert "already running a quantization" in again[0][q.status]
    list(first)


def test_closing_the_tab_mid_run_stops_the_worker_and_frees_the_lock(ui, bundled_dir):
    gen = ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("d"))
    next(gen)
    next(gen)
    gen.close()  # what Gradio does when the client disconnects
    assert not HEAVY_WORK.locked() and ui.app.session(_req("d")).busy is None


def test_model_load_error_in_quantize(ui, tmp_path):
    q = ui.quantize
    outs = list(q.quantize(str(tmp_path), *_args(), request=_req("e")))
    assert "outside the folders" in outs[-1][q.status] or "no config.json" in outs[-1][q.status]
    assert not HEAVY_WORK.locked()


def test_ask_shows_every_held_variant_side_by_side(ui, bundled_dir):
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("f")))
    out = ui.ask.answer_all(str(EXAMPLES_DIR / "easyvqa_test_0.png"), "what is the red shape?", str(bundled_dir),
                            _req("f"))
    html, note = out[ui.ask.answers], out[ui.ask.note]
    assert "FP · full precision" in html and L("W4A4 qvlm") in html and html.count(" ms<") == 2
    assert "No quantized variant" not in note


def test_cancel_raises_the_shared_cancelled_type():
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        check_cancel(ev)


def test_results_panel_evaluates_fp_and_variants_and_reuses_results(ui, bundled_dir):
    r = ui.results
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("g")))
    final = list(r.evaluate(20, str(bundled_dir), _req("g")))[-1]
    assert "2 model(s) evaluated on the same 20 test questions" in final[r.status]
    table = final[r.table]
    assert [row[0] for row in table] == ["FP", L("W4A4 qvlm")] and all(row[2] == 20 for row in table)
    assert [row[1] for row in table] == ["nothing (FP)", "LLM + vision"]  # which towers each row quantized
    assert [t.name for t in final[r.accuracy].data] == ["FP", L("W4A4 qvlm")]
    # a second run with the same subset reuses the stored results (no new computation, one update)
    again = list(r.evaluate(20, str(bundled_dir), _req("g")))
    assert len(again) == 1 and again[0][r.table] == table


@pytest.mark.parametrize("n", [0, -5, "abc", 10**6, 2.5])
def test_results_panel_rejects_a_bad_subset_size(ui, bundled_dir, n):
    outs = list(ui.results.evaluate(n, str(bundled_dir), _req("h")))
    assert len(outs) == 1 and "Choose between 1 and" in outs[0][ui.results.status]


def test_results_panel_cancel_keeps_finished_evaluations(ui, bundled_dir):
    gen = ui.results.evaluate(2000, str(bundled_dir), _req("i"))  # long enough that the cancel lands first
    next(gen)
    ui.app.cancel(_req("i"))
    outs = list(gen)
    assert "Cancelled" in outs[-1][ui.results.status] and not HEAVY_WORK.locked()


def test_ded_is_computed_once_per_sample_count_then_browsed_by_layer(ui, bundled_dir):
    a = ui.analysis
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("k")))
    shown = a.show_ded(L("W4A4 qvlm"), 3, 4, _req("k"))
    assert "Compute DED" in shown[a.ded_note] and len(shown[a.ded_plot].data) == 0  # a pointer, not a failure
    final = list(a.compute_ded(L("W4A4 qvlm"), 3, 4, _req("k")))[-1]
    assert "Done in" in final[a.ded_note] and "R² = 1.0000" in str(final[a.ded_plot].layout.annotations[0].text)
    assert "layers 3–4" in final[a.ded_plot].layout.title.text
    assert "layers 5–6" in a.show_ded(L("W4A4 qvlm"), 5, 4, _req("k"))[a.ded_plot].layout.title.text
    list(a.compute_ded(L("W4A4 qvlm"), 5, 4, _req("k")))
    assert ui.sweeps == [4]  # the second request was served from the stored sweep
    bad = list(a.compute_ded(L("W4A4 qvlm"), 5, 1, _req("k")))
    assert "from 2 to 64" in bad[-1][a.ded_note] and a.ded_plot not in bad[-1]  # the plots stay


def test_ded_plot_shows_the_r2_chance_level(ui, bundled_dir):
    a = ui.analysis
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("m")))
    final = list(a.compute_ded(L("W4A4 qvlm"), 3, 4, _req("m")))[-1]
    assert "(chance level 0.90 for n = 4)" in final[a.ded_plot].layout.annotations[0].text


def test_interaction_verdict_table_and_chart_reach_the_outputs_then_come_from_the_cache(ui, bundled_dir):
    a = ui.analysis
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("n")))
    before = a.show_interaction(L("W4A4 qvlm"), 4, _req("n"))
    assert "Do the layers interact?" in before[a.interaction_note] and before[a.interaction_table] == []
    outs = list(a.compute_interaction(L("W4A4 qvlm"), 4, _req("n")))
    assert len(outs) >= 2 and f"Do the layers of {L('W4A4 qvlm')} interact? (4 samples)" in outs[0][a.interaction_note]
    final = outs[-1]
    assert "Done in" in final[a.interaction_note]
    assert "Made-up verdict for 4 samples" in final[a.verdict]
    table = final[a.interaction_table]
    assert len(table) == 7
    assert table[6] == ["L6–L7", "12.0", "no", "75.0", "—", "25.0", "1.25", "0.5", "0.500", "0.771"]
    bars = final[a.interaction_plot].data[0]
    assert list(bars.x)[:2] == ["L0–L1", "L1–L2"] and bars.y[6] == pytest.approx(12.0)
    assert not HEAVY_WORK.locked() and ui.app.session(_req("n")).busy is None
    # a second request, or another variant and back, redraws from the session's cache
    list(ui.quantize.quantize(str(bundled_dir), *_args("W8A8"), request=_req("n")))
    assert a.show_interaction(L("W8A8 qvlm"), 4, _req("n"))[a.verdict] == ""
    again = list(a.compute_interaction(L("W4A4 qvlm"), 4, _req("n")))
    assert len(again) == 1 and again[0][a.interaction_table] == table
    assert a.show_interaction(L("W4A4 qvlm"), 4, _req("n"))[a.verdict] == final[a.verdict]
    assert ui.diagnostics == [4]
    # the diagnostics are the DED sweep too: DED for the same samples needs no second run
    list(a.compute_ded(L("W4A4 qvlm"), 3, 4, _req("n")))
    assert ui.sweeps == [4]


def test_interaction_rejects_a_bad_sample_count_and_keeps_the_outputs(ui, bundled_dir):
    a = ui.analysis
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("o")))
    bad = list(a.compute_interaction(L("W4A4 qvlm"), 1, _req("o")))
    assert len(bad) == 1 and "from 2 to 64" in bad[0][a.interaction_note] and a.verdict not in bad[0]
    assert ui.diagnostics == []


def _events(*specs):
    from qvlm.ui.jobs import ProgressEvent
    return [ProgressEvent(stage, fraction, message, at) for stage, fraction, message, at in specs]


def test_a_cancelled_stage_is_shown_where_it_stopped_not_finished():
    from qvlm.ui.jobs import StageTracker
    tracker = StageTracker("job")
    tracker.update(_events(("calibration", 1.0, "done", 1.0), ("veo", 0.3, "epoch 3/10", 2.0)))
    cancelled = tracker.markdown("■ Cancelled.")
    assert "✓ **calibration" in cancelled and "100%" in cancelled.splitlines()[1]
    veo = next(line for line in cancelled.splitlines() if "VEO" in line)
    assert veo.startswith("- ■") and " 30%" in veo and "100%" not in veo and "stopped here" in veo
    finished = tracker.markdown("✓ Done.", completed=True)
    assert next(line for line in finished.splitlines() if "VEO" in line).startswith("- ✓")


def test_a_stage_starts_when_the_previous_one_last_reported():
    """The init reports after its first layer; the time before that is the init's, not the calibration's."""
    from qvlm.ui.jobs import StageTracker
    tracker = StageTracker("job")
    tracker.update(_events(("calibration", 0.0, "", 0.0), ("calibration", 1.0, "done", 2.0),
                           ("init", 0.5, "layer 1/2", 70.0), ("init", 1.0, "layer 2/2", 76.0),
                           ("veo", 0.1, "epoch 1/10", 80.0)))
    assert tracker.seconds("calibration") == 2.0 and tracker.seconds("init") == 74.0


def test_cancel_mid_run_leaves_the_running_stage_unfinished(ui, bundled_dir):
    q = ui.quantize
    ui.veo_gate.clear()
    gen = q.quantize(str(bundled_dir), *_args(), request=_req("j9"))
    _until_veo_is_running(gen, q.status)
    ui.app.cancel(_req("j9"))
    final = list(gen)[-1][q.status]
    veo = next(line for line in final.splitlines() if "VEO" in line)
    assert "Cancelled" in final and veo.startswith("- ■") and " 50%" in veo and "stopped here" in veo


def test_ded_view_opens_with_a_sentence_that_reads_the_plotted_r2(ui, bundled_dir):
    a = ui.analysis
    list(ui.quantize.quantize(str(bundled_dir), *_args(), request=_req("p")))
    final = list(a.compute_ded(L("W4A4 qvlm"), 3, 4, _req("p")))[-1]
    annotation = final[a.ded_plot].layout.annotations[0].text
    r2, chance = re.search(r"R² = ([\d.]+) \(chance level ([\d.]+)", annotation).groups()
    assert f"R² {r2}, above the {chance}" in final[a.ded_lead]
    overview = a.show_overview(L("W4A4 qvlm"), _req("p"))
    assert "form 3 blocks" in overview[a.partition_lead] and "(3 blocks)" in overview[a.partition].layout.title.text
    assert "no VEO step" not in overview[a.veo_lead] and overview[a.veo_lead].startswith("No VEO in this variant")
