"""The real thing: start ``app.py`` on a free port, drive it with headless Chromium.

Flow: W4A4 Q-VLM quantization of the bundled model with 8 calibration pairs (the status must
show the stages while it runs, never a running stage at 100%, and the preset line after it), the partition,
DED and "where the vision tower loses" views render in the Analysis tab, an
example image is asked about and both the FP and the quantized answers appear, the easy-VQA
accuracy is measured, and the Analysis tab answers "Do the layers interact?" with a verdict. Then the
other views (second test) and the Download group: a zip caught as a browser download, unzipped and
reloaded (third test). Screenshots and measured timings go to ``test-artifacts/``.

Uses Debian's Chromium through Playwright (``/usr/bin/chromium``); Playwright's own browser
download is never used. Skipped, with the reason, only when that binary is absent.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium); Playwright's browser download is never used"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(bundled_dir: Path):
    """``python app.py`` in a subprocess, as a user (or a Space) starts it; yields its URL."""
    port = _free_port()
    env = {**os.environ, "QVLM_DEFAULT_MODEL": str(bundled_dir), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "e2e_app.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}; see {ARTIFACTS / 'e2e_app.log'}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > 240:  # ~5 s normally; generous for a CI machine under load
                pytest.fail("app.py did not serve within 240 s")
            time.sleep(0.25)
        _record("startup_seconds", round(time.monotonic() - start, 2))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _record(key: str, value) -> None:
    path = ARTIFACTS / "e2e_timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def page(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(30_000)
        pg.goto(app_url, wait_until="load")  # never "networkidle": the page keeps a live connection
        pg.wait_for_selector("#start-btn")
        yield pg
        browser.close()


def _set_number(page, selector: str, value: str) -> None:
    """Fill a number box and make sure the value stuck (a re-render right after page load can reset it)."""
    for _ in range(10):
        page.fill(selector, value)
        page.locator(selector).press("Tab")
        page.wait_for_timeout(300)
        if page.input_value(selector) == value:
            return
    raise AssertionError(f"{selector} would not keep the value {value}")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _quantize_w4a4_rtn(page) -> None:
    """A W4A4 RTN run with 4 calibration pairs (seconds), from the Quantize tab; waits for its result."""
    page.click("#tab-quantize-button")
    if not page.locator("#calib-size input").is_visible():  # the first test leaves the accordion open
        page.click("#advanced button, #advanced .label-wrap")
    _set_number(page, "#calib-size input", "4")
    page.check("#bits input[value='W4A4']")
    page.locator("#recipe input").fill("round-to-nearest")  # the menu filters on its labels, not on "rtn"
    page.keyboard.press("Enter")
    page.click("#start-btn")
    page.wait_for_function(
        "() => { const t = document.querySelector('#quant-status')?.innerText || '';"
        " return t.includes('W4A4 rtn') && t.includes('ready in'); }", timeout=240_000)


def _prepare_download(page, fmt_label: str, fmt: str) -> None:
    """Pick the format whose menu line starts with ``fmt_label``, press the button, wait for the zip named for ``fmt``."""
    page.locator("#export-format input").fill(fmt_label)
    page.keyboard.press("Enter")
    page.click("#download-btn")
    page.wait_for_selector(f"#model-file a[download$='-{fmt}.zip']", timeout=120_000)


def _watch_stage_rows(page, timeout_s: float) -> list[str]:
    """Poll the quantize status until the run is ready; return every row drawn at 100% while still running.

    A stage is drawn done (✓ 100%) only once its successor starts (``StageTracker`` in qvlm/ui/jobs.py), so a
    running row (▶) at 100% means the page claimed a stage finished before the next one began.
    """
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = page.inner_text("#quant-status")
        seen += [line for line in text.splitlines() if "▶" in line and "100%" in line and line not in seen]
        if "ready in" in text:
            return seen
        page.wait_for_timeout(200)
    raise AssertionError(f"no result within {timeout_s} s: {page.inner_text('#quant-status')}")


def _save_download(page, link: str, into: Path) -> Path:
    """Click a file box's link as a user does and save what the browser downloads."""
    with page.expect_download() as caught:
        page.click(link)
    path = into / caught.value.suggested_filename
    caught.value.save_as(path)
    return path


def test_quantize_analyse_and_ask_in_a_real_browser(page):
    # --- Quantize: W4A4, Q-VLM, 8 calibration pairs -------------------------------------------------
    page.click("#advanced button, #advanced .label-wrap")
    _set_number(page, "#calib-size input", "8")
    page.check("#bits input[value='W4A4']")
    _shot(page, "01_quantize_form.png")

    clicked = time.monotonic()
    page.click("#start-btn")
    # live progress: a stage line with a running marker appears before the result
    page.wait_for_function(
        "() => { const t = document.querySelector('#quant-status')?.innerText || '';"
        " return t.includes('▶') || t.includes('ready in'); }", timeout=60_000)
    status_running = page.inner_text("#quant-status")
    _shot(page, "02_quantize_progress.png")
    early_full = _watch_stage_rows(page, timeout_s=240)
    seconds = time.monotonic() - clicked
    _record("click_to_w4a4_qvlm_result_seconds", round(seconds, 1))
    status = page.inner_text("#quant-status")
    assert "W4A4 qvlm" in status and "(8 calibration pairs" in status  # the form's setting reached the core
    assert "▶" in status_running, status_running  # a stage was shown running before the result
    assert "calibration" in status and "VEO" in status and "block-wise percentile search" in status
    assert "W4A4 qvlm" in page.inner_text("#held-variants")
    assert not early_full, early_full  # a running stage is never drawn at 100% before its successor starts
    assert "Preset: recommended" in status and page.inner_text("#preset-line").startswith("Preset: recommended")
    assert "Expected time" in page.inner_text("#run-estimate")
    _shot(page, "03_quantize_done.png")

    # --- Analysis: partition and DED plots render ---------------------------------------------------
    page.click("#tab-analysis-button")
    page.wait_for_function(
        "() => { const t = document.querySelector('#partition-plot')?.textContent || '';"
        " return /\\d+ blocks\\)/.test(t); }", timeout=120_000)
    # DED re-runs the layer-wise init on its samples: 4 keep the test short
    _set_number(page, "#ded-samples input", "4")
    clicked = time.monotonic()
    page.click("#ded-btn")
    page.wait_for_function(
        "() => (document.querySelector('#ded-plot')?.textContent || '').includes('R² =')", timeout=120_000)
    assert page.locator("#partition-plot .main-svg").count() >= 1
    assert page.locator("#ded-plot .main-svg").count() >= 1
    assert "R² =" in page.locator("#qerr-plot").text_content()
    assert "chance level" in page.locator("#ded-plot").text_content()  # R² beside what noise alone reaches
    _record("ded_sweep_4_samples_seconds", round(time.monotonic() - clicked, 1))
    page.wait_for_timeout(500)
    _shot(page, "04_analysis.png")
    # VEO on images it never saw: the held-out error next to the loss, and the verdict in words
    veo_note = page.inner_text("#veo-verdict")
    assert veo_note.startswith("VEO:") and "KL(FP" in veo_note and "unquantized" in veo_note, veo_note
    assert "held-out" in page.locator("#veo-plot").text_content()
    assert "Measured on the bundled models" in page.inner_text("#interaction-measured")
    page.locator("#veo-view").screenshot(path=str(ARTIFACTS / "15_veo_held_out.png"))
    # Where the vision tower loses: the lead sentence, the bars per site and the |x| map of the worst site
    page.click("#vision-btn")
    page.wait_for_function(
        "() => (document.querySelector('#vision-note')?.innerText || '').includes('Done in')", timeout=120_000)
    assert "loses the most" in page.inner_text("#vision-lead"), page.inner_text("#vision-lead")
    assert "fc2 input" in page.locator("#vision-plot").text_content()
    assert page.locator("#vision-map .main-svg").count() >= 1
    page.wait_for_timeout(500)
    page.locator("#vision-view").screenshot(path=str(ARTIFACTS / "16_vision_sites.png"))

    # --- Ask: an example image, both answers side by side -------------------------------------------
    page.click("#tab-ask-button")
    page.locator("#image-examples tbody tr").first.click()
    page.wait_for_function(
        "() => (document.querySelector('#question textarea, #question input')?.value || '').length > 0")
    page.wait_for_selector("#ask-image img")
    page.click("#ask-btn")
    page.wait_for_function("() => document.querySelectorAll('#answers .qvlm-card').length >= 2", timeout=60_000)
    cards = page.locator("#answers .qvlm-card")
    texts = [cards.nth(i).inner_text() for i in range(cards.count())]
    assert "full precision" in texts[0] and any("W4A4 qvlm" in t for t in texts[1:])
    latencies = [int(m.group(1)) for t in texts for m in [re.search(r"(\d+) ms", t)] if m]
    assert len(latencies) == len(texts)
    _record("answer_latency_ms", dict(zip(["FP", *[t.splitlines()[0] for t in texts[1:]]], latencies)))
    page.wait_for_timeout(500)
    _shot(page, "05_ask_side_by_side.png")

    # --- Results: accuracy of FP and the variant on the default 100 test questions, weight memory -----
    page.click("#tab-results-button")
    page.click("#eval-btn")
    page.wait_for_function(
        "() => (document.querySelector('#eval-status')?.innerText || '').includes('model(s) evaluated')",
        timeout=120_000)
    table = page.inner_text("#eval-table")
    assert "FP" in table and "W4A4 qvlm" in table
    assert page.locator("#acc-plot .main-svg").count() >= 1 and page.locator("#mem-plot .main-svg").count() >= 1
    page.wait_for_timeout(500)
    _shot(page, "06_results.png")

    # --- Analysis again: do the layers interact? (4 samples keep it short) ------------------------------
    page.click("#tab-analysis-button")
    _set_number(page, "#interaction-samples input", "4")
    clicked = time.monotonic()
    page.click("#interaction-btn")
    page.wait_for_function(
        "() => (document.querySelector('#interaction-note')?.innerText || '').includes('Done in')", timeout=300_000)
    _record("interaction_4_samples_seconds", round(time.monotonic() - clicked, 1))
    verdict = page.inner_text("#interaction-verdict")
    assert "On this model" in verdict, verdict  # the verdict sentence, computed from the numbers
    assert "L0–L1" in page.inner_text("#interaction-table")
    assert "interact" in page.locator("#interaction-plot").text_content()
    assert page.locator("#interaction-plot .main-svg").count() >= 1
    page.wait_for_timeout(500)
    page.locator("#tab-analysis").screenshot(path=str(ARTIFACTS / "07_interaction.png"))


def test_compare_find_sweep_and_modality_views_in_a_real_browser(page):
    """Token table and finder (Ask), vision switch (Quantize), bit sweep and paper panel (Results), image vs text
    tokens (Analysis): one screenshot each, ``08``-``13``. Tiny N throughout (the finder on 20 questions, the
    sweep one W8A8 RTN point on 20). Runs after the flow above, or alone (then a W4A4 variant is made first)."""
    page.click("#tab-quantize-button")
    if "W4A4" not in page.inner_text("#held-variants"):
        _quantize_w4a4_rtn(page)
    # Ask: an example image, then the token-by-token comparison and the disagreement finder on 20 questions
    page.click("#tab-ask-button")
    page.locator("#image-examples tbody tr").first.click()
    page.wait_for_selector("#ask-image img")
    page.click("#ask-btn")
    page.wait_for_function(
        "() => document.querySelectorAll('#token-table .qvlm-token-step').length >= 1", timeout=60_000)
    assert "KL(FP‖tiny-llava-easyvqa W4A4" in page.inner_text("#token-table")  # variants carry their model
    page.wait_for_timeout(300)
    page.locator("#tokens").screenshot(path=str(ARTIFACTS / "08_ask_tokens.png"))
    page.click("#finder button.label-wrap, #finder .label-wrap")
    _set_number(page, "#finder-n input", "20")
    clicked = time.monotonic()
    page.click("#finder-btn")
    page.wait_for_function(
        "() => (document.querySelector('#finder-status')?.innerText || '').includes('Scanned 20')", timeout=120_000)
    _record("finder_20_questions_seconds", round(time.monotonic() - clicked, 1))
    assert "answers differ from FP" in page.inner_text("#finder-status")
    if page.locator("#finder-gallery img").count():  # something was found: a click asks it
        page.locator("#finder-gallery img").first.click()
        page.wait_for_function(
            "() => (document.querySelector('#question textarea, #question input')?.value || '').length > 0")
    page.wait_for_timeout(500)
    page.locator("#finder").screenshot(path=str(ARTIFACTS / "09_disagreement_finder.png"))

    # Quantize: the vision-tower switch
    page.click("#tab-quantize-button")
    page.locator("#quantize-vision input").uncheck()
    assert not page.locator("#quantize-vision input").is_checked()
    page.locator("#quantize-vision").screenshot(path=str(ARTIFACTS / "10_vision_switch.png"))
    page.locator("#quantize-vision input").check()  # leave the form as it was

    # Results: a one-point sweep (W8A8 RTN, 20 questions) and the paper's panel
    page.click("#tab-results-button")
    for box in page.locator("#sweep-recipes input[type=checkbox]").all():
        box.uncheck()
    page.locator("#sweep-recipes label", has_text="round-to-nearest").locator("input").check()
    for box in page.locator("#sweep-bits input[type=checkbox]").all():
        box.uncheck()
    page.locator("#sweep-bits label", has_text="W8A8").locator("input").check()
    _set_number(page, "#sweep-n input", "20")
    _set_number(page, "#sweep-calib input", "4")
    clicked = time.monotonic()
    page.click("#sweep-btn")
    page.wait_for_function(
        "() => (document.querySelector('#sweep-status')?.innerText || '').includes('point(s) and FP')",
        timeout=180_000)
    _record("sweep_1_point_20_questions_seconds", round(time.monotonic() - clicked, 1))
    assert "W8A8" in page.inner_text("#sweep-table")
    assert "Table 3" in page.locator("#paper-plot").text_content()
    assert "quantized" in page.inner_text("#eval-table")
    page.wait_for_timeout(500)
    page.locator("#sweep").first.screenshot(path=str(ARTIFACTS / "11_bit_sweep.png"))
    page.locator("#paper-table").first.screenshot(path=str(ARTIFACTS / "12_paper_table3.png"))

    # Analysis: image vs text tokens per decoder layer
    page.click("#tab-analysis-button")
    page.click("#modality-btn")
    page.wait_for_function(
        "() => (document.querySelector('#modality-note')?.innerText || '').includes('calibration pairs (')",
        timeout=60_000)
    assert "image tokens" in page.locator("#modality-plot").text_content()
    page.wait_for_timeout(500)
    page.locator("#modality-plot").screenshot(path=str(ARTIFACTS / "13_modality.png"))


def test_download_a_quantized_model_and_reload_it_in_a_real_browser(page, tmp_path):
    """The Quantize tab's Download group: after a W4A4 RTN run, the compressed-tensors zip and then the Q-VLM packed
    zip and the run JSON are caught as browser downloads; the packed zip, unzipped, reloads with
    ``load_model`` and answers. Screenshot ``14``."""
    from qvlm.data import evaluation_subset, is_correct
    from qvlm.export import ACTIVATION_SIDECAR, COMPRESSED_TENSORS, FORMAT_NAME, load_model
    from qvlm.models.inference import generate_answers

    # A fresh page is a fresh session: the download is of the session's latest variant (the one used last), and
    # the tests before this one used their qvlm variant after their rtn run.
    page.reload(wait_until="load")
    page.wait_for_selector("#start-btn")
    _quantize_w4a4_rtn(page)
    clicked = time.monotonic()
    _prepare_download(page, "compressed-tensors", COMPRESSED_TENSORS)
    ct_zip = _save_download(page, "#model-file a[download$='.zip']", tmp_path)
    _record("download_compressed_tensors_seconds", round(time.monotonic() - clicked, 1))
    names = zipfile.ZipFile(ct_zip).namelist()
    assert ct_zip.name.endswith(f"w4a4-rtn-{COMPRESSED_TENSORS}.zip")
    assert any(n.endswith("/config.json") for n in names) and any(n.endswith(ACTIVATION_SIDECAR) for n in names)

    _prepare_download(page, "Q-VLM packed", FORMAT_NAME)
    packed_zip = _save_download(page, "#model-file a[download$='.zip']", tmp_path)
    note = page.inner_text("#download-note")
    assert "W4A4 rtn" in note and re.search(rf"{re.escape(packed_zip.name)}, \d+\.\d (KiB|MiB)", note), note
    _record("download_zip_bytes", {COMPRESSED_TENSORS: ct_zip.stat().st_size, FORMAT_NAME: packed_zip.stat().st_size})
    run = json.loads(_save_download(page, "#run-file a[download$='.json']", tmp_path).read_text())
    assert run["quant_config"]["recipe"] == "rtn" and run["quant_config"]["a_bits"] == 4
    page.wait_for_timeout(300)
    page.locator("#download").first.screenshot(path=str(ARTIFACTS / "14_download.png"))

    with zipfile.ZipFile(packed_zip) as zf:
        zf.extractall(tmp_path / "unzipped")
    (folder,) = (tmp_path / "unzipped").iterdir()
    handle = load_model(folder, device="cpu")
    samples = evaluation_subset(8, seed=3)
    answers = generate_answers(handle.model, handle.processor, [s.load_image() for s in samples],
                               [s.question for s in samples])
    assert len(answers) == 8 and all(answers)
    assert sum(is_correct(a, s.answer) for a, s in zip(answers, samples)) >= 4  # still the easy-VQA model


@pytest.mark.parametrize("model", ["bundled: tiny-llava-easyvqa", "bundled: tiny-llava-mosaic"])
def test_default_start_on_each_bundled_model_reports_true_progress(page, model):
    """A visitor's first click: pick a bundled model, press Start with every other setting at its default (the quick
    run size, the recommended preset, W4A4 Q-VLM). No stage may be drawn at 100% while it still runs, and the result
    names its model. Start→done is recorded per model (``e2e_timings.json``); it is a record, not an assertion."""
    page.reload(wait_until="load")
    page.wait_for_selector("#start-btn")
    page.click("#tab-quantize-button")
    page.locator("#model input").fill(model)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "(m) => (document.querySelector('#model input')?.value || '') === m", arg=model, timeout=30_000)
    short = model.removeprefix("bundled: ")
    clicked = time.monotonic()
    page.click("#start-btn")
    early_full = _watch_stage_rows(page, timeout_s=600)
    _record(f"default_start_to_done_seconds[{short}]", round(time.monotonic() - clicked, 1))
    status = page.inner_text("#quant-status")
    assert f"{short} W4A4 qvlm" in status, status
    assert "Preset: recommended" in status and "calibration" in status and "VEO" in status
    assert not early_full, early_full
    page.locator("#quant-status").screenshot(path=str(ARTIFACTS / f"17_default_start_{short}.png"))
    page.click("#tab-analysis-button")  # the partition of this model's decoder, with its lead sentence
    page.wait_for_function(
        "() => /\\d+ blocks\\)/.test(document.querySelector('#partition-plot')?.textContent || '')", timeout=120_000)
    assert "decoder layers" in page.inner_text("#partition-lead")
    page.wait_for_timeout(500)
    page.locator("#partition-plot").screenshot(path=str(ARTIFACTS / f"18_partition_{short}.png"))
