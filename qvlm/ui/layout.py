"""The Blocks layout: four tabs (Quantize, Analysis, Ask, Results) wired to a :class:`Controller`.

Components carry stable ``elem_id``s: the browser test selects by them (Gradio 6 role
queries are unreliable) and they double as documentation of what each part is.
"""

from __future__ import annotations

import gradio as gr

from qvlm import plots
from qvlm.data import load_split
from qvlm.ui import quant_bridge as qb
from qvlm.ui import texts
from qvlm.ui.callbacks import EVAL_COLUMNS, Controller
from qvlm.ui.render import answers_html, variants_markdown
from qvlm.ui.settings import EXAMPLES_DIR, Settings


def _help(text: str) -> None:
    with gr.Accordion("What am I looking at?", open=False):
        gr.Markdown(text)


def build_app(settings: Settings | None = None, default_model: str | None = None) -> gr.Blocks:
    """The whole app. ``default_model`` (or ``QVLM_DEFAULT_MODEL``) overrides the bundled model."""
    settings = settings or Settings.from_env(default_model=default_model)
    ctl = Controller(settings)
    defaults = qb.default_values()
    n_test = len(load_split("test"))

    with gr.Blocks(title="Q-VLM Studio", analytics_enabled=False) as demo:
        gr.Markdown(texts.TITLE)
        gr.Markdown(texts.SUBTITLE)
        with gr.Tabs():
            # ---------------------------------------------------------------- Quantize
            with gr.Tab("1 · Quantize", id="tab-quantize", elem_id="tab-quantize"):
                _help(texts.QUANTIZE_HELP)
                with gr.Row():
                    model = gr.Dropdown(settings.model_choices(), value=settings.default_model, label="Model",
                                        info="The bundled tiny LLaVA, an allowed local folder, or a hub LLaVA id.",
                                        allow_custom_value=True, elem_id="model", scale=3)
                    bits = gr.Radio(list(qb.BITS), value="W4A4", label="Bit-width (weights / activations)",
                                    elem_id="bits", scale=2)
                    recipe = gr.Dropdown(qb.recipe_choices(), value="qvlm", label="Recipe", elem_id="recipe", scale=2)
                with gr.Accordion("Advanced: QuantConfig", open=False, elem_id="advanced"):
                    with gr.Row():
                        calib = gr.Number(defaults["calib_size"], label="Calibration pairs (easy-VQA train)",
                                          precision=0, minimum=1, maximum=256, elem_id="calib-size")
                        depth = gr.Slider(1, 6, value=defaults["max_block_depth"], step=1,
                                          label="Max block depth (layers per block)", elem_id="max-depth")
                        h0 = gr.Dropdown(list(qb.H0_RULES), value=str(defaults["h0_rule"]), allow_custom_value=True,
                                         label="h0 rule (threshold on D(k,k+1); 'mean', 'median' or a number)",
                                         elem_id="h0-rule")
                    percentiles = gr.Textbox(", ".join(f"{p:g}" for p in defaults["percentiles"]),
                                             label="Percentile grid searched per layer", elem_id="percentiles")
                    with gr.Row():
                        veo_epochs = gr.Number(defaults["veo_epochs"], precision=0, minimum=0, maximum=100,
                                               label="VEO epochs", elem_id="veo-epochs")
                        veo_eta = gr.Number(defaults["veo_eta"], label="η (LLM-output error weight)", elem_id="veo-eta")
                        veo_l1 = gr.Number(defaults["veo_lambda1"], label="λ1 (entropy term)", elem_id="veo-l1")
                        veo_l2 = gr.Number(defaults["veo_lambda2"], label="λ2 (error term)", elem_id="veo-l2")
                with gr.Row():
                    start = gr.Button("Start quantization", variant="primary", elem_id="start-btn")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                status = gr.Markdown("*Pick a model and a bit-width, then press **Start quantization**.*",
                                     elem_id="quant-status")
                held = gr.Markdown(variants_markdown([], settings.variant_budget_bytes, settings.max_variants),
                                   elem_id="held-variants")

            # ---------------------------------------------------------------- Analysis
            with gr.Tab("2 · Analysis", id="tab-analysis", elem_id="tab-analysis"):
                _help(texts.ANALYSIS_HELP)
                variant = gr.Dropdown([], value=None, label="Quantized variant", elem_id="analysis-variant")
                info = gr.Markdown("*Quantize a model first (Quantize tab).*", elem_id="analysis-info")
                partition = gr.Plot(plots.partition_figure([], []), label="Block partition", elem_id="partition-plot")
                with gr.Row(equal_height=True):
                    layer = gr.Slider(0, 6, value=3, step=1, label="DED of decoder layers k, k+1: choose k",
                                      elem_id="ded-layer", scale=3)
                    n_samples = gr.Number(16, precision=0, minimum=2, maximum=64, label="DED samples",
                                          elem_id="ded-samples", scale=1)
                    ded_btn = gr.Button("Compute DED", elem_id="ded-btn", scale=1)
                    ded_cancel = gr.Button("Cancel", variant="stop", elem_id="ded-cancel-btn", scale=1)
                ded_note = gr.Markdown("", elem_id="ded-note")
                with gr.Row():
                    ded = gr.Plot(plots.ded_scatter([], 0), label="DED vs entropy", elem_id="ded-plot")
                    qerr = gr.Plot(plots.ded_scatter([], 0, "qerr"), label="DED vs quantization error",
                                   elem_id="qerr-plot")
                with gr.Row():
                    errors = gr.Plot(plots.layer_error_figure({}), label="Per-layer error", elem_id="error-plot")
                    veo = gr.Plot(plots.veo_loss_figure([]), label="VEO loss", elem_id="veo-plot")

            # ---------------------------------------------------------------- Ask
            with gr.Tab("3 · Ask", id="tab-ask", elem_id="tab-ask"):
                _help(texts.ASK_HELP)
                with gr.Row():
                    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=260,
                                     elem_id="ask-image", scale=1)
                    with gr.Column(scale=2):
                        question = gr.Textbox(label="Question", placeholder="what shape is in the image?",
                                              max_lines=2, elem_id="question")
                        ask = gr.Button("Ask", variant="primary", elem_id="ask-btn")
                        generic = ctl.examples.get("generic_questions", [])
                        if generic:
                            gr.Examples([[q] for q in generic], inputs=[question], label="Example questions",
                                        elem_id="question-examples", cache_examples=False)
                answers = gr.HTML(answers_html([]), elem_id="answers")
                ask_note = gr.Markdown("", elem_id="ask-note")
                images = ctl.examples.get("images", [])
                if images:
                    gr.Examples(
                        [[str(EXAMPLES_DIR / img["file"]), img["questions"][0]["question"]] for img in images],
                        inputs=[image, question], label="Example images (easy-VQA test split): click one",
                        elem_id="image-examples", cache_examples=False, examples_per_page=12,
                    )

            # ---------------------------------------------------------------- Results
            with gr.Tab("4 · Results", id="tab-results", elem_id="tab-results"):
                _help(texts.RESULTS_HELP)
                with gr.Row():
                    n_eval = gr.Slider(10, n_test, value=100, step=10, label="Test questions (fixed random subset)",
                                       elem_id="eval-n", scale=3)
                    run_eval = gr.Button("Evaluate FP and variants", variant="primary", elem_id="eval-btn", scale=1)
                    cancel_eval = gr.Button("Cancel", variant="stop", elem_id="eval-cancel-btn", scale=1)
                eval_status = gr.Markdown("", elem_id="eval-status")
                table = gr.Dataframe(headers=EVAL_COLUMNS, interactive=False, elem_id="eval-table", wrap=True)
                with gr.Row():
                    acc = gr.Plot(plots.accuracy_figure([]), label="Accuracy", elem_id="acc-plot")
                    mem = gr.Plot(plots.memory_figure([]), label="Weight memory", elem_id="mem-plot")

        gr.Markdown(f"<small>{texts.PAPER}. Q-VLM Studio runs on CPU; quantized weights are "
                    "stored packed for real, activations are fake-quantized, as in the paper's released code.</small>")

        # ---------------------------------------------------------------- events
        heavy = dict(concurrency_limit=max(2, settings.concurrency), concurrency_id="heavy")
        quant_inputs = [model, bits, recipe, calib, depth, h0, percentiles, veo_epochs, veo_eta, veo_l1, veo_l2]
        (start.click(ctl.quantize, quant_inputs, [status, variant, held, layer], show_progress="minimal",
                     api_name="quantize", **heavy)
         .then(ctl.overview, [variant], [info, partition, errors, veo], api_name=False)
         .then(ctl.ded, [variant, layer, n_samples], [ded, qerr, ded_note], api_name=False))
        cancel.click(ctl.cancel, None, None, concurrency_limit=None, api_name="cancel")
        cancel_eval.click(ctl.cancel, None, None, concurrency_limit=None, api_name=False)
        ded_cancel.click(ctl.cancel, None, None, concurrency_limit=None, api_name=False)

        (variant.input(ctl.overview, [variant], [info, partition, errors, veo], api_name="overview")
         .then(ctl.ded, [variant, layer, n_samples], [ded, qerr, ded_note], api_name=False))
        layer.release(ctl.ded, [variant, layer, n_samples], [ded, qerr, ded_note], api_name="ded")
        n_samples.submit(ctl.ded, [variant, layer, n_samples], [ded, qerr, ded_note], api_name=False)
        ded_btn.click(ctl.compute_ded, [variant, layer, n_samples], [ded_note, ded, qerr], show_progress="minimal",
                      api_name="compute_ded", **heavy)

        # preprocess=False: the image arrives as a file path that ctl.ask checks itself, so a file that
        # is not an image gets a message instead of failing inside Gradio's own image decoding.
        ask_kwargs = dict(preprocess=False, concurrency_limit=settings.concurrency, concurrency_id="ask")
        ask.click(ctl.ask, [image, question, model], [answers, ask_note], api_name="ask", **ask_kwargs)
        question.submit(ctl.ask, [image, question, model], [answers, ask_note], api_name=False, **ask_kwargs)

        run_eval.click(ctl.evaluate, [n_eval, model], [eval_status, table, acc, mem], show_progress="minimal",
                       api_name="evaluate", **heavy)

        demo.load(ctl.on_page_load, None, [held], api_name=False)
        demo.unload(ctl.drop_session)
    demo.controller = ctl  # type: ignore[attr-defined]  # for tests and app.py introspection
    return demo
