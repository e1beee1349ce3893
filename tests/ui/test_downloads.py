"""The Quantize tab's Download group on a REAL W4A4 RTN run of the bundled model.

The panel's ``download`` handler is called as the app calls it (one session per test scenario);
each zip is unzipped and reloaded the way its format's users would: the packed one with
``qvlm.export.load_model`` (it must answer exactly like the variant held in the app), the
compressed-tensors one with plain ``LlavaForConditionalGeneration.from_pretrained``. Then the run
JSON, one file per format and session, the clear refusal of NF4 weights in compressed-tensors, the
session's temporary folder disappearing with the session, and the ``/download`` HTTP endpoint.
"""

from __future__ import annotations

import json
import re
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from qvlm.data import evaluation_subset
from qvlm.export import BITSANDBYTES, COMPRESSED_TENSORS, FORMAT_NAME, README, load_model
from qvlm.models.inference import generate_answers
from qvlm.ui.panel_quantize import QuantizePanel
from qvlm.ui.panel_results import ResultsPanel
from qvlm.ui.settings import Settings
from qvlm.ui.downloads import failure_message
from qvlm.ui.state import AppState, SessionRegistry, remove_stale_session_folders

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# bits, recipe, calib, depth, h0, percentiles, VEO epochs, eta, lambda1, lambda2
RTN_RUN = ["W4A4", "rtn", 4, 3, "mean", "1.0, 0.99", 0, 1.0, 0.01, 1.0]
NF4_RUN = ["W4A4", "qlora", 4, 3, "mean", "1.0, 0.99", 0, 1.0, 0.01, 1.0]


def _req(sid: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=sid)


@pytest.fixture(scope="module")
def ui(bundled_dir: Path):
    """The Quantize and Results panels as build_app makes them, after one real W4A4 RTN run in session "rtn"."""
    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], preload=False))
    quantize, results = QuantizePanel(app), ResultsPanel(app)
    with gr.Blocks():
        quantize.layout()
        results.layout()
    outs = list(quantize.quantize(str(bundled_dir), *RTN_RUN, request=_req("rtn")))
    assert "ready in" in outs[-1][quantize.status], outs[-1][quantize.status]
    list(results.evaluate(8, str(bundled_dir), request=_req("rtn")))  # an evaluation for the run JSON
    yield SimpleNamespace(app=app, panel=quantize, model=str(bundled_dir))
    for sid in ("rtn", "nf4", "empty"):
        app.sessions.drop(sid)


def _download(ui, fmt: str, sid: str = "rtn") -> dict:
    return ui.panel.download(fmt, request=_req(sid))


def _unzip(archive: str, into: Path) -> Path:
    """The one folder the zip holds, extracted under ``into``."""
    with zipfile.ZipFile(archive) as zf:
        tops = {Path(name).parts[0] for name in zf.namelist()}
        zf.extractall(into)
    assert len(tops) == 1, tops
    return into / tops.pop()


def _questions(n: int = 12) -> tuple[list, list[str]]:
    samples = evaluation_subset(n, seed=3)
    return [s.load_image() for s in samples], [s.question for s in samples]


def test_packed_zip_reloads_and_answers_exactly_like_the_variant_in_the_app(ui, tmp_path):
    out = _download(ui, FORMAT_NAME)
    zip_path = Path(out[ui.panel.model_file])
    assert zip_path.name == f"tiny-llava-easyvqa-w4a4-rtn-{FORMAT_NAME}.zip"
    note = out[ui.panel.download_note]
    assert re.search(rf"`{re.escape(zip_path.name)}`, \d+\.\d (KiB|MiB)", note), note
    reloaded = load_model(_unzip(str(zip_path), tmp_path), device="cpu")
    held = ui.app.session(_req("rtn")).variants.variants()[-1].handle
    images, questions = _questions()
    ours = generate_answers(held.model, held.processor, images, questions)
    assert generate_answers(reloaded.model, reloaded.processor, images, questions) == ours
    assert all(ours)


def test_compressed_tensors_zip_loads_in_plain_transformers_and_answers(ui, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = _download(ui, COMPRESSED_TENSORS)
    folder = _unzip(out[ui.panel.model_file], tmp_path)
    assert "from_pretrained" in out[ui.panel.download_note]
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()  # plain: no extra argument, no warm-up
    processor = AutoProcessor.from_pretrained(folder)
    images, questions = _questions()
    answers = generate_answers(model, processor, images, questions)  # under torch.inference_mode
    assert len(answers) == len(questions) and all(answers)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"


def test_run_json_holds_the_config_statistics_and_evaluation(ui):
    out = _download(ui, FORMAT_NAME)
    record = json.loads(Path(out[ui.panel.run_file]).read_text())
    variant = ui.app.session(_req("rtn")).variants.variants()[-1]
    assert record["quant_config"] == variant.result.config.to_dict()
    assert record["quant_config"]["recipe"] == "rtn" and record["quant_config"]["w_bits"] == 4
    assert record["statistics"]["timings"]["total"] > 0 and record["quantize_seconds"] > 0
    assert record["weight_memory"]["quant_bytes"] < record["weight_memory"]["fp16_bytes"]
    assert [e["questions"] for e in record["evaluation"]] == [8] and 0 <= record["evaluation"][0]["accuracy"] <= 1
    assert [e["questions"] for e in record["fp_evaluation"]] == [8]
    assert Path(out[ui.panel.run_file]).name in out[ui.panel.download_note]


def test_a_session_keeps_one_file_per_format(ui):
    first = Path(_download(ui, FORMAT_NAME)[ui.panel.model_file])
    second = Path(_download(ui, FORMAT_NAME)[ui.panel.model_file])
    _download(ui, COMPRESSED_TENSORS)
    folder = ui.app.session(_req("rtn")).files
    zips = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.zip"))
    assert zips == [f"{COMPRESSED_TENSORS}/tiny-llava-easyvqa-w4a4-rtn-{COMPRESSED_TENSORS}.zip",
                    f"{FORMAT_NAME}/tiny-llava-easyvqa-w4a4-rtn-{FORMAT_NAME}.zip"]
    assert second == first and second.is_file()
    assert len(list(folder.rglob("*.json"))) == 1 and not list(folder.glob("*staging*"))


def test_before_a_run_the_download_says_to_quantize_first(ui):
    out = _download(ui, FORMAT_NAME, sid="empty")
    assert set(out) == {ui.panel.download_note}  # the file boxes keep whatever they showed
    assert "quantization above first" in out[ui.panel.download_note]


@pytest.fixture(scope="module")
def nf4(ui):
    """Session "nf4" after a real W4A4 QLoRA-style run (NF4 weights, like the default qvlm recipe)."""
    outs = list(ui.panel.quantize(ui.model, *NF4_RUN, request=_req("nf4")))
    assert "ready in" in outs[-1][ui.panel.status]
    return ui


def test_nf4_weights_in_compressed_tensors_get_a_clear_message_and_keep_the_packed_file(nf4):
    ui = nf4
    packed = Path(_download(ui, FORMAT_NAME, sid="nf4")[ui.panel.model_file])
    out = _download(ui, COMPRESSED_TENSORS, sid="nf4")
    assert set(out) == {ui.panel.download_note, ui.panel.run_file}  # the run JSON is still there to download
    assert Path(out[ui.panel.run_file]).is_file()
    note = out[ui.panel.download_note]
    assert note.startswith("⚠") and "Traceback" not in note
    assert "compressed-tensors needs uniform (integer) weights: this variant has NF4 weights" in note
    assert BITSANDBYTES in note and FORMAT_NAME in note
    assert packed.is_file()  # what the user already had stays
    assert not (ui.app.session(_req("nf4")).files / COMPRESSED_TENSORS).exists()


def test_the_format_menu_offers_what_the_variant_can_be_written_in_and_says_why_not_the_rest(nf4):
    ui = nf4
    menu = ui.panel.offer_formats(request=_req("nf4"))
    assert [value for _, value in menu.choices] == [FORMAT_NAME, BITSANDBYTES] and menu.value == FORMAT_NAME
    assert "compressed-tensors needs uniform (integer) weights: this variant has NF4 weights" in menu.info
    menu = ui.panel.offer_formats(request=_req("rtn"))
    assert [value for _, value in menu.choices] == [FORMAT_NAME, COMPRESSED_TENSORS]
    assert "bitsandbytes needs NF4 weights: this variant has uniform" in menu.info
    menu = ui.panel.offer_formats(request=_req("empty"))  # nothing held yet: every format, no reason
    assert len(menu.choices) == 3


def test_bitsandbytes_zip_of_the_nf4_variant_loads_in_plain_transformers_and_answers(nf4, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ui = nf4
    out = _download(ui, BITSANDBYTES, sid="nf4")
    folder = _unzip(out[ui.panel.model_file], tmp_path)
    assert "W4A16" in out[ui.panel.download_note] and "W4A16" in (folder / README).read_text()
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model.model.language_model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    images, questions = _questions(4)
    answers = generate_answers(model, processor, images, questions)
    assert len(answers) == 4 and all(answers)


def test_a_bitsandbytes_download_of_a_uniform_variant_is_refused_with_the_reason(ui):
    out = _download(ui, BITSANDBYTES)
    assert "bitsandbytes needs NF4 weights" in out[ui.panel.download_note]


def test_a_disk_error_names_the_file_not_the_servers_path(tmp_path):
    err = OSError(28, "No space left on device", str(tmp_path / "deep" / "model.zip"))
    message = failure_message(err)
    assert "No space left on device" in message and "model.zip" in message and str(tmp_path) not in message


def test_a_restarted_server_removes_the_session_folders_a_killed_one_left(tmp_path):
    """kill -9 ends no session: their folders stay on disk (and Gradio would serve them) until the next start."""
    old = SessionRegistry().get("before-the-kill").files_dir(tmp_path)
    (old / "run").mkdir()
    (old / "run" / "model-run.json").write_text("{}")
    other = tmp_path / "not-ours"
    other.mkdir()
    assert remove_stale_session_folders(tmp_path) == 1
    assert not old.exists() and other.is_dir()
    assert remove_stale_session_folders(tmp_path / "missing") == 0


def test_after_a_restart_the_page_says_so(bundled_dir):
    app = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], preload=False))
    restarted = AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir],
                                                preload=False))
    notice, keep = restarted.restart_notice(app.server_id)  # the browser last saw the server before the restart
    assert "The server restarted; variants from before are gone - quantize again" in notice
    assert keep == restarted.server_id != app.server_id
    for seen in (None, restarted.server_id):  # a first visit, a reload: no notice
        notice, _ = restarted.restart_notice(seen)
        assert notice == gr.skip()


def test_the_session_folder_is_removed_when_the_session_ends(ui):
    outs = list(ui.panel.quantize(ui.model, *RTN_RUN, request=_req("closing")))
    assert "ready in" in outs[-1][ui.panel.status]
    _download(ui, FORMAT_NAME, sid="closing")
    folder = ui.app.session(_req("closing")).files
    assert folder.is_dir() and folder.is_relative_to(ui.panel.model_file.GRADIO_CACHE)
    ui.app.drop_session(_req("closing"))  # what the page's unload event calls when the tab closes
    assert not folder.exists()


def test_an_evicted_idle_session_takes_its_folder_with_it(tmp_path):
    registry = SessionRegistry(max_sessions=1)
    folder = registry.get("old").files_dir(tmp_path)
    (folder / "model.zip").write_bytes(b"x")
    registry.get("new")
    assert "old" not in registry and not folder.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_over_http_serves_the_one_copy_in_the_session_folder(bundled_dir, tmp_path, monkeypatch):
    """``/download`` after ``/quantize``; the server's cache then holds the zip once, in the session's folder
    (Gradio serves it in place, so removing that folder removes every server-side copy)."""
    from gradio_client import Client

    from qvlm.ui import build_app

    cache = tmp_path / "server-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    settings = Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir], hub_models=(), preload=False)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=settings.concurrency)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "client"))
        *_, note = client.predict(FORMAT_NAME, api_name="/download")
        assert "quantization above first" in note
        status, *_ = client.predict(str(bundled_dir), *RTN_RUN, True, False, api_name="/quantize")
        assert "ready in" in status, status
        model_zip, run_json, note = client.predict(COMPRESSED_TENSORS, api_name="/download")
        name = f"tiny-llava-easyvqa-w4a4-rtn-{COMPRESSED_TENSORS}.zip"
        assert Path(model_zip).name == name and re.search(r"\d+\.\d (KiB|MiB)", note), note
        assert zipfile.ZipFile(model_zip).testzip() is None
        assert json.loads(Path(run_json).read_text())["quant_config"]["recipe"] == "rtn"
        on_server = [p.relative_to(cache).parts[0] for p in cache.rglob(name)]
        assert len(on_server) == 1 and on_server[0].startswith("qvlm-session-"), on_server
    finally:
        demo.close()
    remove_stale_session_folders(cache)  # what the next start of the server does (closing may have ended the session)
    assert not list(cache.rglob(name))


def test_the_download_note_says_the_bytes_du_and_a_plain_load_measure_on_the_unzipped_folder(ui, tmp_path):
    import subprocess

    from tests.plain_transformers import plain_load
    from qvlm.export.sizes import answering_bytes, resident_bytes

    pytest.importorskip("compressed_tensors")
    out = _download(ui, COMPRESSED_TENSORS)
    folder = _unzip(out[ui.panel.model_file], tmp_path)
    note = out[ui.panel.download_note]
    du = int(subprocess.run(["du", "-b", "-s", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0])
    model, processor = plain_load(folder)
    loaded = resident_bytes(model)
    answering = answering_bytes(model, processor)
    assert f"files: {du:,} bytes (du -b)" in note
    assert f"after plain from_pretrained: {loaded:,} bytes" in note and f"while answering: {answering:,} bytes" in note
    assert "% of the FP16 model's" in note  # compared with the FP model the variant came from


def test_the_results_tab_builds_where_no_table4_was_measured(monkeypatch, bundled_dir):
    from qvlm.ui import panel_results

    monkeypatch.setattr(panel_results, "read_table4", lambda folder: None)
    panel = ResultsPanel(AppState.from_settings(Settings(default_model=str(bundled_dir), allowed_roots=[bundled_dir],
                                                         preload=False)))
    with gr.Blocks() as demo:
        panel.layout()
    notes = [c.value for c in demo.blocks.values() if getattr(c, "elem_id", None) == "table4-note"]
    assert notes and "python benchmarks/table4.py" in notes[0] and "table4-" in notes[0]
