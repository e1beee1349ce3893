"""The launched app through its HTTP API (gradio_client), as a script or a Space would use it.

Checks what only a real server shows: uploads reach the Ask handler un-decoded (so a file
that is not an image gets our message, not Gradio's generic error), the queue is on with a
default concurrency limit, and the app builds and serves quickly.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from qvlm.ui import Settings, build_app
from qvlm.ui.settings import EXAMPLES_DIR

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(bundled_dir: Path):
    start = time.monotonic()
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], hub_models=(), preload=False)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=settings.concurrency)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    startup = time.monotonic() - start
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client, startup, settings
    client.close() if hasattr(client, "close") else None
    demo.close()


def test_serves_with_a_queue(served):
    demo, _, startup, settings = served
    # a hang guard, not a speed target (benchmarks time things): a startup that loads a model or waits on a hub
    # shows up as minutes
    assert startup < 120, f"build + launch took {startup:.1f} s"
    assert demo._queue is not None and demo._queue.default_concurrency_limit == settings.concurrency


def test_api_lists_each_panels_main_endpoint_and_nothing_internal(served):
    _, client, _, _ = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/quantize", "/download", "/ask", "/compare_tokens", "/find_disagreements", "/evaluate",
                     "/bit_sweep", "/cancel", "/overview", "/ded", "/compute_ded", "/interaction", "/modality",
                     "/vision_sites"}
    assert any("disagree" in name for name in names)


def test_ask_over_http_with_an_example_image(served, bundled_dir):
    from gradio_client import handle_file

    _, client, _, _ = served
    html, note = client.predict(handle_file(str(EXAMPLES_DIR / "easyvqa_test_7.png")), "what color is the circle?",
                                str(bundled_dir), api_name="/ask")
    assert "FP · full precision" in html and "reference answer: <b>green</b>" in html
    assert "No quantized variant yet" in note


def test_ask_over_http_with_a_file_that_is_not_an_image(served, bundled_dir, tmp_path):
    from gradio_client import handle_file

    bogus = tmp_path / "holiday.jpg"
    bogus.write_bytes(b"%PDF-1.4 definitely not a jpeg")
    _, client, _, _ = served
    _, note = client.predict(handle_file(str(bogus)), "what color is the circle?", str(bundled_dir), api_name="/ask")
    assert "not an image" in note


def test_quantize_over_http_reports_a_bad_setting(served, bundled_dir):
    _, client, _, _ = served
    status, *_ = client.predict(str(bundled_dir), "W4A4", "qvlm", 8, 3, "mean", "1.0, banana", 1, 1.0, 0.01, 1.0,
                                False, False, api_name="/quantize")
    assert "'banana' is not a number" in status


def test_finder_over_http_without_a_variant_says_to_quantize_first(served, bundled_dir):
    _, client, _, _ = served
    status, *_ = client.predict(str(bundled_dir), [], 20, api_name="/find_disagreements")
    assert "Quantize the model first" in status


def test_on_a_space_every_heavy_call_asks_spaces_for_a_gpu(bundled_dir, monkeypatch):
    """On a (ZeroGPU) Space the core calls are wrapped in spaces.GPU with the app's durations."""
    import sys
    import types

    from qvlm.ui.app import GPU_SECONDS
    from qvlm.ui.panel_analysis import VIEWS

    asked: list[int] = []

    def gpu(duration: int):
        asked.append(duration)
        return lambda fn: fn

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.setenv("SPACE_ID", "someone/q-vlm-studio")
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], hub_models=(), preload=False)
    build_app(settings)
    measured = [v.gpu_seconds for v in VIEWS.values() if v.gpu_seconds]  # the views that measure something
    assert sorted(asked) == sorted([*GPU_SECONDS.values(), *measured])


def test_a_new_analysis_view_is_wired_from_the_panel_alone(bundled_dir, monkeypatch):
    """The registry (AnalysisPanel.events): a view added there gets its endpoint and its redraw after a variant
    is picked, with no line of build_app changed; every handler's outputs are the ones its event lists."""
    import gradio as gr

    import qvlm.ui.app as app_module
    from qvlm.ui.panel_analysis import AnalysisEvent, AnalysisPanel

    class WithOneMoreView(AnalysisPanel):
        def layout(self) -> None:
            super().layout()
            self.extra_btn, self.extra_note = gr.Button("Extra"), gr.Markdown("")

        def extra(self, label, request=None):
            return {self.extra_note: f"extra view of {label}"}

        def events(self, model):
            return [*super().events(model),
                    AnalysisEvent((self.extra_btn.click,), self.extra, (self.variant,), (self.extra_note,),
                                  "extra_view", redraw=True)]

    monkeypatch.setattr(app_module, "AnalysisPanel", WithOneMoreView)
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], hub_models=(), preload=False)
    demo = build_app(settings)
    fns = list(demo.fns.values())
    named = {f.api_name: f for f in fns if f.api_name}
    assert named["extra_view"].fn.__name__ == "extra" and named["overview"].fn.__name__ == "show_overview"
    redraws = [f for f in fns if f.fn is not None and f.fn.__name__ == "extra"]
    assert len(redraws) == 3  # its button, the variant menu's redraw, and the redraw after a run made a variant


def test_every_analysis_view_has_its_how_to_read_box_from_the_registry(bundled_dir):
    """Each view's help is written once (VIEWS) and drawn beside the view, so a view never ships without one."""
    import gradio as gr

    from qvlm.ui.panel_analysis import VIEWS

    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], hub_models=(), preload=False)
    demo = build_app(settings)
    boxes = {b.elem_id for b in demo.blocks.values() if isinstance(b, gr.Accordion)}
    for view in VIEWS.values():
        assert view.help.strip() and view.title
        assert f"{view.name.replace('_', '-')}-help" in boxes, view.name
