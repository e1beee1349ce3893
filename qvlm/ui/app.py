"""``build_app()``: the page (four tabs, one panel object each) and the events that connect them.

It reads top to bottom like the page: the tabs in order, then each action's wiring in the same
order. Components carry stable ``elem_id``s: the browser test selects by them (Gradio 6 role
queries are unreliable) and they double as documentation of what each part is. The named
``api_name``s are the app's HTTP API (``/quantize``, ``/download``, ``/ask``, ``/compare_tokens``,
``/find_disagreements``, ``/evaluate``, ``/bit_sweep``, ``/modality``, ...).
"""

from __future__ import annotations

import gradio as gr

from qvlm.evaluation.analysis import ded_sweep, dependency_diagnostics
from qvlm.evaluation.compare import bit_sweep, disagreement_scan, token_comparison
from qvlm.evaluation.modality import modality_activation_stats
from qvlm.evaluation.vision_sites import vision_site_errors
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


GPU_SECONDS = {"quantize": 900, "ded": 600, "diagnostics": 900, "modality": 120, "vision_sites": 120, "tokens": 60,
               "scan": 600, "sweep": 1800}
"""Upper bounds a ZeroGPU Space reserves a GPU for, per heavy call (spaces.GPU(duration=...); no-op elsewhere)."""


def build_app(settings: Settings | None = None, default_model: str | None = None) -> gr.Blocks:
    """The whole app. ``default_model`` (or ``QVLM_DEFAULT_MODEL``) overrides the bundled model."""
    app = AppState.from_settings(settings or Settings.from_env(default_model=default_model))
    on_gpu = {name: gpu_task(seconds) for name, seconds in GPU_SECONDS.items()}  # identity outside Spaces
    quantize = QuantizePanel(app, quantize=on_gpu["quantize"](quantize_model))
    analysis = AnalysisPanel(app, ded_sweep=on_gpu["ded"](ded_sweep),
                             dependency_diagnostics=on_gpu["diagnostics"](dependency_diagnostics),
                             modality_stats=on_gpu["modality"](modality_activation_stats),
                             vision_sites=on_gpu["vision_sites"](vision_site_errors))
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
        overview = [analysis.info, analysis.partition_lead, analysis.partition, analysis.error_lead, analysis.errors,
                    analysis.veo_lead, analysis.veo, analysis.veo_note]
        ded_inputs = [analysis.variant, analysis.layer, analysis.n_samples]
        ded = [analysis.ded_lead, analysis.ded_plot, analysis.qerr_plot, analysis.ded_note]
        interaction_inputs = [analysis.variant, analysis.interaction_samples]
        interaction = [analysis.interaction_note, analysis.interaction_lead, analysis.verdict,
                       analysis.interaction_table, analysis.interaction_plot]

        # Quantize: the preset line and the expected time follow every change of the form; a run size sets
        # the calibration pairs and VEO epochs (which the user may still edit)
        described = [*quantize.form, quantize.run_size]
        gr.on([c.change for c in described], quantize.describe_form, described,
              [quantize.preset_line, quantize.estimate], **internal)
        quantize.run_size.input(quantize.choose_run_size, [quantize.run_size],
                                [quantize.calib_size, quantize.veo_epochs], **internal)

        # Quantize: run, then open the new variant in the Analysis tab
        (quantize.start.click(quantize.quantize, quantize.form, [quantize.status, quantize.held, quantize.new_variant],
                              api_name="quantize", **long_job)
         .then(analysis.select_variant, [quantize.new_variant], [analysis.variant, analysis.layer], **internal)
         .then(analysis.show_overview, [analysis.variant], overview, **internal)
         .then(analysis.show_ded, ded_inputs, ded, **internal)
         .then(analysis.show_interaction, interaction_inputs, interaction, **internal)
         .then(ask.offer_variants, [quantize.model], [ask.finder_variants], **internal)
         .then(quantize.offer_formats, None, [quantize.export_format], **internal))
        gr.on([quantize.cancel.click, analysis.cancel.click, analysis.interaction_cancel.click,
               analysis.vision_cancel.click, results.cancel.click, ask.finder_cancel.click, results.sweep_cancel.click],
              app.cancel, concurrency_limit=None, api_name="cancel")
        # Quantize: download the latest variant in a chosen format, with the run's JSON (one at a time: a
        # large model's zip is gigabytes of disk and minutes of CPU)
        quantize.download_btn.click(quantize.download, [quantize.export_format], quantize.downloads,
                                    api_name="download", concurrency_limit=1, concurrency_id="download")

        # Analysis: pick a variant, browse DED by layer, measure DED, ask whether the layers interact
        (analysis.variant.input(analysis.show_overview, [analysis.variant], overview, api_name="overview")
         .then(analysis.show_ded, ded_inputs, ded, **internal)
         .then(analysis.show_interaction, interaction_inputs, interaction, **internal))
        gr.on([analysis.layer.release, analysis.n_samples.submit], analysis.show_ded, ded_inputs, ded, api_name="ded")
        analysis.compute.click(analysis.compute_ded, ded_inputs,
                               ded, api_name="compute_ded",
                               **long_job)
        analysis.interaction_samples.submit(analysis.show_interaction, interaction_inputs, interaction, **internal)
        analysis.interaction_btn.click(analysis.compute_interaction, interaction_inputs, interaction,
                                       api_name="interaction", **long_job)
        analysis.modality_btn.click(analysis.compute_modality, [quantize.model, analysis.modality_pairs],
                                    [analysis.modality_note, analysis.modality_lead, analysis.modality_plot,
                                     analysis.modality_table],
                                    api_name="modality", **long_job)
        # Analysis: where the vision tower loses (a long job), then any site's |x| map (one vision pass)
        vision_map_inputs = [analysis.variant, analysis.vision_layer, analysis.vision_site, analysis.vision_samples]
        analysis.vision_btn.click(analysis.compute_vision_sites, [analysis.variant, analysis.vision_samples],
                                  [analysis.vision_note, analysis.vision_lead, analysis.vision_plot, analysis.vision_layer,
                                   analysis.vision_site, analysis.vision_map, analysis.vision_map_note],
                                  api_name="vision_sites", **long_job)
        gr.on([analysis.vision_layer.release, analysis.vision_site.input], analysis.show_vision_map, vision_map_inputs,
              [analysis.vision_map, analysis.vision_map_note], **internal)

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
