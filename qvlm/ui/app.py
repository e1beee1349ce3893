"""``build_app()``: the page (four tabs, one panel object each) and the events that connect them.

It reads top to bottom like the page: the tabs in order, then each action's wiring in the same
order. Components carry stable ``elem_id``s: the browser test selects by them (Gradio 6 role
queries are unreliable) and they double as documentation of what each part is. The named
``api_name``s are the app's HTTP API (``/quantize``, ``/download``, ``/ask``, ``/compare_tokens``,
``/find_disagreements``, ``/evaluate``, ``/bit_sweep``, ``/modality``, ...).
"""

from __future__ import annotations

import gradio as gr

from qvlm.evaluation.compare import bit_sweep, disagreement_scan, token_comparison
from qvlm.models import gpu_task
from qvlm.quant import quantize as quantize_model
from qvlm.ui import texts
from qvlm.ui.panel_analysis import AnalysisPanel
from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.panel_quantize import QuantizePanel
from qvlm.ui.panel_results import ResultsPanel
from qvlm.ui.settings import Settings
from qvlm.ui.state import AppState


def help_accordion(text: str) -> None:
    """The closed "What am I looking at?" box at the top of a tab."""
    with gr.Accordion("What am I looking at?", open=False):
        gr.Markdown(text)


GPU_SECONDS = {"quantize": 900, "tokens": 60, "scan": 600, "sweep": 1800}
"""Upper bounds a ZeroGPU Space reserves a GPU for, per heavy call (spaces.GPU(duration=...); no-op elsewhere);
the Analysis tab's measurements carry theirs (``qvlm.ui.panel_analysis.VIEWS``)."""


def build_app(settings: Settings | None = None, default_model: str | None = None) -> gr.Blocks:
    """The whole app. ``default_model`` (or ``QVLM_DEFAULT_MODEL``) overrides the bundled model."""
    app = AppState.from_settings(settings or Settings.from_env(default_model=default_model))
    on_gpu = {name: gpu_task(seconds) for name, seconds in GPU_SECONDS.items()}  # identity outside Spaces
    quantize = QuantizePanel(app, quantize=on_gpu["quantize"](quantize_model))
    analysis = AnalysisPanel(app, gpu=gpu_task)
    ask = AskPanel(app, token_comparison=on_gpu["tokens"](token_comparison),
                   disagreement_scan=on_gpu["scan"](disagreement_scan))
    results = ResultsPanel(app, bit_sweep=on_gpu["sweep"](bit_sweep))

    with gr.Blocks(title="Q-VLM Studio", analytics_enabled=False) as demo:
        gr.Markdown(texts.TITLE)
        gr.Markdown(texts.SUBTITLE)
        with gr.Tabs():
            with gr.Tab("1 · Quantize", id="tab-quantize", elem_id="tab-quantize"):
                help_accordion(texts.QUANTIZE_HELP)
                quantize.layout()
            with gr.Tab("2 · Analysis", id="tab-analysis", elem_id="tab-analysis"):
                help_accordion(texts.ANALYSIS_HELP)
                analysis.layout()
            with gr.Tab("3 · Ask", id="tab-ask", elem_id="tab-ask"):
                help_accordion(texts.ASK_HELP)
                ask.layout()
            with gr.Tab("4 · Results", id="tab-results", elem_id="tab-results"):
                help_accordion(texts.RESULTS_HELP)
                results.layout()
        gr.Markdown(texts.FOOTER)

        # Long jobs share one queue; its limit is at least 2 so that a second session's job waits
        # inside its handler, where it is told what it waits for, not silently in Gradio's queue.
        long_job = dict(concurrency_limit=max(2, app.settings.concurrency), concurrency_id="long-job",
                        show_progress="minimal")
        internal = dict(api_visibility="private")  # a step of the page, not an HTTP endpoint
        views = analysis.events(model=quantize.model)
        redraws = [e for e in views if e.redraw]

        def redraw_analysis(listen, named: bool):
            """Draw every cached Analysis view of the chosen variant again, in order, after ``listen``'s event;
            ``named``: the views that only redraw carry their API name (the user picked the variant)."""
            dep = None
            for e in redraws:
                name = dict(api_name=e.api_name) if named and not e.triggers and e.api_name else internal
                dep = (listen if dep is None else dep.then)(e.handler, list(e.inputs), list(e.outputs), **name)
            return dep

        # Quantize: the preset line and the expected time follow every change of the form; a run size sets
        # the calibration pairs and VEO epochs (which the user may still edit)
        described = [*quantize.form, quantize.run_size]
        gr.on([c.change for c in described], quantize.describe_form, described,
              [quantize.preset_line, quantize.estimate], **internal)
        quantize.run_size.input(quantize.choose_run_size, [quantize.run_size],
                                [quantize.calib_size, quantize.veo_epochs], **internal)

        # Quantize: run, then open the new variant in the Analysis tab
        made = (quantize.start.click(quantize.quantize, quantize.form,
                                     [quantize.status, quantize.held, quantize.new_variant], api_name="quantize",
                                     **long_job)
                .then(analysis.select_variant, [quantize.new_variant], [analysis.variant, analysis.layer], **internal))
        (redraw_analysis(made.then, named=False)
         .then(ask.offer_variants, [quantize.model], [ask.finder_variants], **internal)
         .then(quantize.offer_formats, None, [quantize.export_format], **internal))
        gr.on([b.click for b in (quantize.cancel, *analysis.cancel_buttons, results.cancel, ask.finder_cancel,
                                 results.sweep_cancel)],
              app.cancel, concurrency_limit=None, api_name="cancel")
        # Quantize: download the latest variant in a chosen format, with the run's JSON (one at a time: a
        # large model's zip is gigabytes of disk and minutes of CPU)
        quantize.download_btn.click(quantize.download, [quantize.export_format], quantize.downloads,
                                    api_name="download", concurrency_limit=1, concurrency_id="download")

        # Analysis: every view as the panel describes it (AnalysisPanel.events); picking a variant redraws them
        redraw_analysis(analysis.variant.input, named=True)
        for e in views:
            if e.triggers:
                name = dict(api_name=e.api_name) if e.api_name else internal
                gr.on(list(e.triggers), e.handler, list(e.inputs), list(e.outputs), **name,
                      **(long_job if e.long_job else {}))

        # Ask: preprocess=False, so the image arrives as a file path that answer_all checks itself and a
        # file that is not an image gets a message instead of failing inside Gradio's own image decoding.
        # Then the token-by-token comparison; a question found by the disagreement finder is asked the same way.
        ask_inputs = [ask.image, ask.question, quantize.model]
        tokens = [ask.token_note, ask.token_table, ask.token_plot]
        ask_light = dict(preprocess=False, concurrency_limit=app.settings.concurrency, concurrency_id="ask")
        (gr.on([ask.ask_button.click, ask.question.submit], ask.answer_all, inputs=ask_inputs,
               outputs=[ask.answers, ask.note], api_name="ask", **ask_light)
         .then(ask.compare_tokens, ask_inputs, tokens, api_name="compare_tokens", **ask_light))
        ask.finder_start.click(ask.find_disagreements, [quantize.model, ask.finder_variants, ask.finder_n],
                               [ask.finder_status, ask.found, ask.found_rows], api_name="find_disagreements",
                               **long_job)
        (ask.found.select(ask.load_found, [ask.found_rows], [ask.image, ask.question], **internal)
         .then(ask.answer_all, ask_inputs, [ask.answers, ask.note], **internal, **ask_light)
         .then(ask.compare_tokens, ask_inputs, tokens, **internal, **ask_light))
        quantize.model.change(ask.offer_variants, [quantize.model], [ask.finder_variants], **internal)
        quantize.model.change(ask.offer_examples, [quantize.model], ask.example_boxes, **internal)  # the model's task

        # Results
        results.start.click(results.evaluate, [results.n_questions, quantize.model],
                            [results.status, results.table, results.accuracy, results.memory],
                            api_name="evaluate", **long_job)
        results.sweep_start.click(results.sweep, [results.sweep_recipes, results.sweep_bits, results.sweep_n,
                                                  results.sweep_calib, quantize.model],
                                  [results.sweep_status, results.sweep_plot, results.sweep_table],
                                  api_name="bit_sweep", **long_job)

        # The page: show this session's variants on (re)load, warm the default model up, forget a closed tab
        demo.load(quantize.show_held, None, [quantize.held], **internal)
        demo.load(quantize.offer_formats, None, [quantize.export_format], **internal)
        demo.load(quantize.describe_form, described, [quantize.preset_line, quantize.estimate], **internal)
        # The server id the page last saw, kept by the browser: fixed key and secret so a restarted server reads it
        seen_server = gr.BrowserState(None, storage_key="qvlm-server-id", secret="qvlm-server-id")
        demo.load(app.restart_notice, [seen_server], [quantize.status, seen_server], **internal)
        demo.load(ask.offer_variants, [quantize.model], [ask.finder_variants], **internal)
        demo.load(ask.warm_up, None, None, **internal)
        demo.unload(app.drop_session)  # also removes the session's temporary files (downloads)
    return demo
