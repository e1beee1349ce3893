"""Quantize-panel job handling with a stand-in for the core: streaming, cancel, the cross-session
lock, LRU eviction with a message. Fast and deterministic; the real core is exercised in
tests/test_ui_quantize.py and the browser test."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from qvlm.progress import Cancelled, check_cancel
from qvlm.ui import callbacks
from qvlm.ui.callbacks import Controller
from qvlm.ui.jobs import HEAVY_WORK
from qvlm.ui.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclasses.dataclass
class FakeConfig:
    bits: str
    recipe: str
    calib_size: int


def _fake_build_config(bits, recipe, calib_size, *rest):
    if int(calib_size) < 1:
        raise ValueError("Calibration size must be between 1 and 256 (got 0).")
    return FakeConfig(bits, recipe, int(calib_size))


@pytest.fixture
def ctl(bundled_dir: Path, monkeypatch) -> Controller:
    monkeypatch.setattr(callbacks.qb, "build_config", _fake_build_config)
    c = Controller(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], max_variants=2,
                            preload=False))

    def fake_run(base, cfg, progress, cancel, delay=0.05):
        fp = c.models.get(base)
        for stage, steps in (("calibration", 2), ("veo", 4), ("entropy", 1), ("search", 3)):
            for i in range(steps):
                check_cancel(cancel, stage)
                progress(stage, (i + 1) / steps, f"{stage} {i + 1}/{steps}")
                time.sleep(delay)
        return SimpleNamespace(handle=fp, config=cfg, entropies=[0.5] * 7, h0=0.5, blocks=[[0, 1, 2], [3, 4], [5, 6, 7]],
                               percentiles={k: 1.0 for k in range(8)}, layer_errors=[], veo_losses=[], timings={})

    monkeypatch.setattr(c, "_run_quantize", fake_run)
    return c


def _args(bits="W4A4", recipe="qvlm", calib=8):
    return [bits, recipe, calib, 3, "mean", "1.0, 0.99", 1, 1.0, 0.01, 1.0]


def _req(sid):
    return SimpleNamespace(session_hash=sid)


def test_progress_streams_stage_by_stage_then_the_variant_appears(ctl, bundled_dir):
    outs = list(ctl.quantize(str(bundled_dir), *_args(), request=_req("j1")))
    statuses = [o[0] for o in outs]
    assert len(statuses) >= 3  # streamed, not one final update
    assert any("**calibration" in s for s in statuses[:-1])
    assert any("▶ **" in s for s in statuses[:-1])  # a running stage is shown as such
    assert "✓ **VEO" in statuses[-1] and "✓ **block-wise percentile search" in statuses[-1]
    final_status, dropdown, held, slider = outs[-1]
    assert "W4A4 qvlm" in final_status and "ready in" in final_status
    assert dropdown["choices"] == [("W4A4 qvlm", "W4A4 qvlm")] or "W4A4 qvlm" in str(dropdown["choices"])
    assert dropdown["value"] == "W4A4 qvlm" and "1/2" in held
    assert slider["maximum"] == 6


def test_bad_config_is_reported_before_anything_runs(ctl, bundled_dir):
    outs = list(ctl.quantize(str(bundled_dir), *_args(calib=0), request=_req("j2")))
    assert len(outs) == 1 and "Calibration size" in outs[0][0]
    assert ctl.session(_req("j2")).busy is None


def test_cancel_mid_run_keeps_held_variants(ctl, bundled_dir):
    list(ctl.quantize(str(bundled_dir), *_args("W8A8", "rtn"), request=_req("j3")))
    gen = ctl.quantize(str(bundled_dir), *_args(), request=_req("j3"))
    next(gen)
    ctl.cancel(_req("j3"))
    outs = list(gen)
    assert "Cancelled" in outs[-1][0] and "still here" in outs[-1][0]
    assert ctl.session(_req("j3")).variants.labels() == ["W8A8 rtn"]
    assert ctl.session(_req("j3")).busy is None and not HEAVY_WORK.locked()


def test_lru_eviction_is_announced(ctl, bundled_dir):
    for bits in ("W8A8", "W6A6"):
        list(ctl.quantize(str(bundled_dir), *_args(bits), request=_req("j4")))
    final = list(ctl.quantize(str(bundled_dir), *_args("W4A4"), request=_req("j4")))[-1]
    assert "dropped the least recently used variant 'W8A8 qvlm'" in final[0]
    assert ctl.session(_req("j4")).variants.labels() == ["W6A6 qvlm", "W4A4 qvlm"]
    # the Analysis panel asked for the dropped variant says so instead of failing
    info, *_ = ctl.overview("W8A8 qvlm", _req("j4"))
    assert "no longer held" in info


def test_second_session_waits_with_a_message(ctl, bundled_dir):
    first = ctl.quantize(str(bundled_dir), *_args(), request=_req("a"))
    next(first)  # session a now holds the lock
    assert HEAVY_WORK.locked()
    second = ctl.quantize(str(bundled_dir), *_args("W8A8"), request=_req("b"))
    waiting = next(second)[0]
    assert "Waiting: another session is running a quantization (W4A4 qvlm)" in waiting
    list(first)  # a finishes and releases the lock
    outs = list(second)
    assert "W8A8 qvlm" in outs[-1][0] and "ready in" in outs[-1][0]


def test_same_session_cannot_start_twice(ctl, bundled_dir):
    first = ctl.quantize(str(bundled_dir), *_args(), request=_req("c"))
    next(first)
    again = list(ctl.quantize(str(bundled_dir), *_args("W8A8"), request=_req("c")))
    assert "already running a quantize" in again[0][0]
    list(first)


def test_closing_the_tab_mid_run_stops_the_worker_and_frees_the_lock(ctl, bundled_dir):
    gen = ctl.quantize(str(bundled_dir), *_args(), request=_req("d"))
    next(gen)
    next(gen)
    gen.close()  # what Gradio does when the client disconnects
    assert not HEAVY_WORK.locked() and ctl.session(_req("d")).busy is None


def test_model_load_error_in_quantize(ctl, tmp_path):
    outs = list(ctl.quantize(str(tmp_path), *_args(), request=_req("e")))
    assert "outside the folders" in outs[-1][0] or "no config.json" in outs[-1][0]
    assert not HEAVY_WORK.locked()


def test_ask_shows_every_held_variant_side_by_side(ctl, bundled_dir):
    from qvlm.ui.settings import EXAMPLES_DIR

    list(ctl.quantize(str(bundled_dir), *_args(), request=_req("f")))
    html, note = ctl.ask(str(EXAMPLES_DIR / "easyvqa_test_0.png"), "what is the red shape?", str(bundled_dir), _req("f"))
    assert "FP · full precision" in html and "W4A4 qvlm" in html and html.count(" ms<") == 2
    assert "No quantized variant" not in note


def test_cancel_raises_the_shared_cancelled_type():
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        check_cancel(ev)


def test_results_panel_evaluates_fp_and_variants_and_reuses_results(ctl, bundled_dir):
    list(ctl.quantize(str(bundled_dir), *_args(), request=_req("g")))
    outs = list(ctl.evaluate(20, str(bundled_dir), _req("g")))
    status, table, acc_fig, mem_fig = outs[-1]
    assert "2 model(s) evaluated on the same 20 test questions" in status
    assert [row[0] for row in table] == ["FP", "W4A4 qvlm"] and all(row[1] == 20 for row in table)
    assert [t.name for t in acc_fig.data] == ["FP", "W4A4 qvlm"]
    # a second run with the same subset reuses the stored results (no new computation, one update)
    again = list(ctl.evaluate(20, str(bundled_dir), _req("g")))
    assert len(again) == 1 and again[0][1] == table


@pytest.mark.parametrize("n", [0, -5, "abc", 10**6])
def test_results_panel_rejects_a_bad_subset_size(ctl, bundled_dir, n):
    outs = list(ctl.evaluate(n, str(bundled_dir), _req("h")))
    assert len(outs) == 1 and "Choose between 1 and" in outs[0][0]


def test_results_panel_cancel_keeps_finished_evaluations(ctl, bundled_dir):
    gen = ctl.evaluate(200, str(bundled_dir), _req("i"))
    next(gen)
    ctl.cancel(_req("i"))
    outs = list(gen)
    assert "Cancelled" in outs[-1][0] and not HEAVY_WORK.locked()


def test_ded_is_computed_once_per_sample_count_then_browsed_by_layer(ctl, bundled_dir, monkeypatch):
    calls = []

    def fake_sweep(fp, result, n, progress, cancel):
        calls.append(n)
        progress("ded", 1.0, "layer 6")
        pts = [{"sample": i, "entropy": 0.1 * i, "ded": 0.2 * i + 0.01, "qerr": 0.05 * i * i} for i in range(n)]
        return {k: SimpleNamespace(layer=k, block=[k, k + 1], points=pts, fit=None, qerr_fit=None) for k in range(7)}

    monkeypatch.setattr(callbacks.qb, "ded_sweep", fake_sweep)
    list(ctl.quantize(str(bundled_dir), *_args(), request=_req("k")))
    ded_fig, qerr_fig, note = ctl.ded("W4A4 qvlm", 3, 4, _req("k"))
    assert "Compute DED" in note and len(ded_fig.data) == 0  # nothing measured yet: a pointer, not a failure
    outs = list(ctl.compute_ded("W4A4 qvlm", 3, 4, _req("k")))
    note, ded_fig, qerr_fig = outs[-1]
    assert "Done in" in note and "R² = 1.0000" in str(ded_fig.layout.annotations[0].text)
    assert "layers 3–4" in ded_fig.layout.title.text
    ded_fig5, _, _ = ctl.ded("W4A4 qvlm", 5, 4, _req("k"))
    assert "layers 5–6" in ded_fig5.layout.title.text
    list(ctl.compute_ded("W4A4 qvlm", 5, 4, _req("k")))
    assert calls == [4]  # the second request was served from the stored sweep
    bad = list(ctl.compute_ded("W4A4 qvlm", 5, 1, _req("k")))
    assert "from 2 to 64" in bad[-1][0]
