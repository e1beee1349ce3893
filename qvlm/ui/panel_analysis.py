"""Analysis tab: block partition, per-layer error, VEO loss, and DED vs entropy / quantization error.

The partition, errors and losses come with the quantization result and draw instantly
(:meth:`AnalysisPanel.show_overview`). The DED needs its own measurement (a rebuild of the
layer-wise init plus a search per sample), so :meth:`~AnalysisPanel.compute_ded` measures every
layer at once on request and :meth:`~AnalysisPanel.show_ded` then draws any layer from that cache.
"Do the layers interact?" works the same way: :meth:`~AnalysisPanel.compute_interaction` runs the
dependency diagnostics of every adjacent decoder pair and :meth:`~AnalysisPanel.show_interaction`
draws the verdict, the table and the chart from the variant's cache. "Where the vision tower loses"
measures, on request, the image-token error each vision site's activation rounding adds alone
(:func:`~qvlm.evaluation.vision_sites.vision_site_errors`) and draws one site's |x| with its ranges.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from qvlm.ui import explain, plots, texts
from qvlm.evaluation.analysis import DEPENDENCY_REPORT, INTERACTION_THRESHOLD, InteractionCounts, PairSummary, \
    ded_sweep, dependency_diagnostics, read_dependency_reports, veo_outcome
from qvlm.models import BUNDLED_MODELS
from qvlm.evaluation.modality import ModalityRow, modality_activation_stats
from qvlm.evaluation.vision_sites import SITE_ROLES, SITE_SAMPLES, site_activation_map, vision_site_errors
from qvlm.quant import QuantConfig, get_recipe
from qvlm.quant.acceptance import acceptance_sentence
from qvlm.utils.progress import STAGE_INIT, STAGE_VEO, ProgressCallback
from qvlm.ui.feedback import Outputs, warn
from qvlm.ui.jobs import LongJob, stream_job
from qvlm.ui.render import human_bytes
from qvlm.ui.inputs import parse_count
from qvlm.ui.state import AppState, Variant, canonical_name

DEDSweepFn = Callable[..., list[Any]]
DiagnosticsFn = Callable[..., Any]
ModalityFn = Callable[..., list[ModalityRow]]
VisionSitesFn = Callable[..., Any]
GpuTask = Callable[[int], Callable[[Callable], Callable]]

@dataclass(frozen=True)
class AnalysisView:
    """One view of the Analysis tab, described once: its title, how to read it, and what its measurement costs.

    The layout draws each view's heading and "How to read it" box from here; the GPU seconds are what a ZeroGPU Space
    reserves for the view's measurement (``qvlm.models.gpu_task``; 0: the view draws what the run recorded). What the
    view fires and draws is its :class:`AnalysisEvent`; its figure and lead sentence come from ``plots`` / ``explain``.
    """

    name: str
    title: str
    help: str
    gpu_seconds: int = 0


VIEWS: dict[str, AnalysisView] = {v.name: v for v in (
    AnalysisView("partition", "Block partition", texts.PARTITION_HELP),
    AnalysisView("ded", "DED vs entropy", texts.DED_HELP, gpu_seconds=600),
    AnalysisView("interaction", "Do the layers interact?", texts.INTERACTION_HELP, gpu_seconds=900),
    AnalysisView("errors", "Per-layer error", texts.ERRORS_HELP),
    AnalysisView("veo", "VEO loss", texts.VEO_HELP),
    AnalysisView("modality", "Image tokens vs text tokens", texts.MODALITY_HELP, gpu_seconds=120),
    AnalysisView("vision_sites", "Where the vision tower loses", texts.VISION_SITES_HELP, gpu_seconds=120),
)}
"""The tab's views, top to bottom."""


def view_header(name: str, heading: bool = True) -> None:
    """A view's heading (``heading``: its title as a section heading; else the plot's label says it) and its closed
    "How to read it" box."""
    view = VIEWS[name]
    if heading:
        gr.Markdown(f"### {view.title}")
    with gr.Accordion("How to read it", open=False, elem_id=f"{name.replace('_', '-')}-help"):
        gr.Markdown(view.help)


@dataclass(frozen=True)
class AnalysisEvent:
    """One action of the Analysis tab, described once: what fires it, what it reads, what it writes.

    ``build_app`` wires every event of :meth:`AnalysisPanel.events` the same way, so a new view is its
    components and handler here (and its figure and sentence in ``plots`` / ``explain``), never an edit of
    ``app.py``; a handler returns a dict keyed by the ``outputs`` listed here, and nowhere else.
    ``api_name`` None: a step of the page, not an HTTP endpoint. ``long_job``: shares the long-job queue.
    ``redraw``: also drawn again, in order, whenever a variant is picked or made (from its cache); an event with
    no ``triggers`` of its own is only that, and its ``api_name`` names the picking of a variant.
    """

    triggers: tuple[Any, ...]
    handler: Callable[..., Any]
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    api_name: str | None = None
    long_job: bool = False
    redraw: bool = False
VISION_SAMPLES = 4
"""Calibration pairs for the vision sites: one vision-tower pass per site, so a few keep it at a second or two."""
MODALITY_COLUMNS = ["layer", "image p99.9 |x|", "image max |x|", "text p99.9 |x|", "text max |x|",
                    "image / text (p99.9)"]
MODALITY_PAIRS = 8
"""Calibration pairs for the image-vs-text statistics: one forward pass, enough for stable percentiles."""
MODALITY_MAX_PAIRS = 64
INTERACTION_COLUMNS = ["pair", "interaction share %", "joint = greedy?", "DED = 0 share %", "DED / controllable",
                       "controllable share %", "gain", "branch response", "R² entropy→DED", "R² chance level (5%)"]
DED_SAMPLES = (2, 64)
"""DED samples allowed: a regression line needs two points; beyond 64 the sweep ties up the CPU for minutes."""


def picked_variant(session: Any, label: str | None, n_samples: Any,
                   parse: Callable[[Any], int]) -> tuple[Variant, int] | str:
    """The variant a long analysis job runs on and its sample count, or the warning to show instead."""
    variant = session.variants.find_label(label)
    if variant is None:
        return "Quantize a model first, then pick the variant to analyse."
    try:
        return variant, parse(n_samples)
    except ValueError as err:
        return str(err)


def _sample_count(value: Any) -> int:
    """The DED sample count as an int; ValueError with the allowed range otherwise."""
    return parse_count(value, *DED_SAMPLES, "DED samples")


def measured_interaction_markdown(models: dict[str, Any] | None = None) -> str:
    """What ``python -m qvlm diagnose`` measured on each bundled model, side by side.

    Why shown before any run: the diagnostics take minutes, and the point to teach is the
    contrast between a model whose layers' errors add up and one whose layers interact.
    Every figure comes from the model folder's stored report; a model without one says so.
    """
    lines = ["| model | bits | pairs with interaction share ≥ "
             f"{100 * INTERACTION_THRESHOLD:.0f}% | joint ≠ greedy | R² above chance | verdict |",
             "|---|---|---|---|---|---|"]
    missing = []
    for name, folder in (models if models is not None else BUNDLED_MODELS).items():
        reports = read_dependency_reports(f"{folder}/{DEPENDENCY_REPORT}")
        if not reports:
            missing.append(name)
        for bits, r in reports.items():
            c = InteractionCounts.of(r.pairs)
            samples = "?" if r.samples is None else r.samples
            lines.append(f"| {name} | {bits} ({samples} samples) | {c.interacting} of {c.pairs} | "
                         f"{c.differs} of {c.pairs} | {c.above_chance} of {c.pairs} | {r.verdict.split(':')[0]} |")
    if len(lines) == 2:
        return "*No stored diagnostics yet: `python -m qvlm diagnose --model bundled` measures them.*"
    note = f" No stored report for {', '.join(missing)}." if missing else ""
    return ("**Measured on the bundled models** (`python -m qvlm diagnose`; the button below measures the "
            f"variant you pick):{note}\n\n" + "\n".join(lines))


class AnalysisPanel:
    """The Analysis tab: its components (made by :meth:`layout`) and its handlers.

    ``ded_sweep`` is :func:`qvlm.evaluation.analysis.ded_sweep`, ``dependency_diagnostics`` is
    :func:`qvlm.evaluation.analysis.dependency_diagnostics` and ``modality_stats`` is
    :func:`qvlm.evaluation.modality.modality_activation_stats`; a test passes stand-ins with their signatures.
    """

    def __init__(self, app: AppState, ded_sweep: DEDSweepFn = ded_sweep,
                 dependency_diagnostics: DiagnosticsFn = dependency_diagnostics,
                 modality_stats: ModalityFn = modality_activation_stats,
                 vision_sites: VisionSitesFn = vision_site_errors, gpu: GpuTask | None = None) -> None:
        """``gpu``: :func:`qvlm.models.gpu_task` in the app (each measurement reserves its view's ``gpu_seconds``)."""
        self.app = app
        on_gpu = gpu or (lambda seconds: lambda fn: fn)
        self._vision_sites = on_gpu(VIEWS["vision_sites"].gpu_seconds)(vision_sites)
        self._ded_sweep = on_gpu(VIEWS["ded"].gpu_seconds)(ded_sweep)
        self._diagnostics = on_gpu(VIEWS["interaction"].gpu_seconds)(dependency_diagnostics)
        self._modality_stats = on_gpu(VIEWS["modality"].gpu_seconds)(modality_stats)

    def layout(self) -> None:
        """The tab's components, top to bottom; handlers read and write them by attribute."""
        self.variant = gr.Dropdown([], value=None, label="Quantized variant", elem_id="analysis-variant")
        self.info = gr.Markdown("*Quantize a model first (Quantize tab).*", elem_id="analysis-info")
        view_header("partition", heading=False)
        self.partition_lead = gr.Markdown("", elem_id="partition-lead")
        self.partition = gr.Plot(plots.partition_figure([], []), label=VIEWS["partition"].title, elem_id="partition-plot")
        with gr.Row(equal_height=True):
            self.layer = gr.Slider(0, 6, value=3, step=1, label="DED of decoder layers k, k+1: choose k",
                                   elem_id="ded-layer", scale=3)
            self.n_samples = gr.Number(16, minimum=DED_SAMPLES[0], maximum=DED_SAMPLES[1],
                                       label="DED samples", elem_id="ded-samples", scale=1)
            self.compute = gr.Button("Compute DED", elem_id="ded-btn", scale=1)
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="ded-cancel-btn", scale=1)
        view_header("ded", heading=False)
        self.ded_note = gr.Markdown("", elem_id="ded-note")
        self.ded_lead = gr.Markdown("", elem_id="ded-lead")
        with gr.Row():
            self.ded_plot = gr.Plot(plots.ded_scatter([], 0), label=VIEWS["ded"].title, elem_id="ded-plot")
            self.qerr_plot = gr.Plot(plots.ded_scatter([], 0, "qerr"), label="DED vs quantization error",
                                     elem_id="qerr-plot")
        view_header("interaction")
        self.measured = gr.Markdown(measured_interaction_markdown(), elem_id="interaction-measured")
        with gr.Row(equal_height=True):
            self.interaction_samples = gr.Number(16, minimum=DED_SAMPLES[0], maximum=DED_SAMPLES[1],
                                                 label="Samples", elem_id="interaction-samples", scale=1)
            self.interaction_btn = gr.Button("Do the layers interact?", variant="primary", elem_id="interaction-btn",
                                             scale=2)
            self.interaction_cancel = gr.Button("Cancel", variant="stop", elem_id="interaction-cancel-btn", scale=1)
        self.interaction_note = gr.Markdown("", elem_id="interaction-note")
        self.interaction_lead = gr.Markdown("", elem_id="interaction-lead")
        self.verdict = gr.Markdown("", elem_id="interaction-verdict")
        self.interaction_plot = gr.Plot(plots.interaction_figure([], INTERACTION_THRESHOLD), label="Interaction share",
                                        elem_id="interaction-plot")
        self.interaction_table = gr.Dataframe(headers=INTERACTION_COLUMNS, interactive=False, wrap=True,
                                              elem_id="interaction-table")
        gr.Markdown(explain.INTERACTION_LEGEND, elem_id="interaction-legend")
        with gr.Row():
            with gr.Column():
                view_header("errors", heading=False)
                self.error_lead = gr.Markdown("", elem_id="error-lead")
                self.errors = gr.Plot(plots.layer_error_figure({}), label=VIEWS["errors"].title, elem_id="error-plot")
            with gr.Column(elem_id="veo-view"):
                view_header("veo", heading=False)
                self.veo_lead = gr.Markdown("", elem_id="veo-lead")
                self.veo = gr.Plot(plots.veo_loss_figure([]), label=VIEWS["veo"].title, elem_id="veo-plot")
                self.veo_note = gr.Markdown("", elem_id="veo-verdict")
        view_header("modality")
        self.modality_lead = gr.Markdown("", elem_id="modality-lead")
        with gr.Row(equal_height=True):
            self.modality_pairs = gr.Number(MODALITY_PAIRS, minimum=1, maximum=MODALITY_MAX_PAIRS,
                                            label="Calibration pairs", elem_id="modality-pairs", scale=1)
            self.modality_btn = gr.Button("Measure image vs text tokens", elem_id="modality-btn", scale=2)
        self.modality_note = gr.Markdown(texts.MODALITY_NOTE, elem_id="modality-note")
        self.modality_plot = gr.Plot(plots.modality_figure([]), label="Image vs text tokens",
                                     elem_id="modality-plot")
        self.modality_table = gr.Dataframe(headers=MODALITY_COLUMNS, interactive=False, elem_id="modality-table")
        with gr.Column(elem_id="vision-view"):
            view_header("vision_sites")
            self.vision_lead = gr.Markdown("", elem_id="vision-lead")
            with gr.Row(equal_height=True):
                self.vision_samples = gr.Number(VISION_SAMPLES, minimum=SITE_SAMPLES[0], maximum=SITE_SAMPLES[1],
                                                label="Calibration pairs", elem_id="vision-samples", scale=1)
                self.vision_btn = gr.Button("Measure the vision sites", elem_id="vision-btn", scale=2)
                self.vision_cancel = gr.Button("Cancel", variant="stop", elem_id="vision-cancel-btn", scale=1)
            self.vision_note = gr.Markdown(texts.VISION_SITES_NOTE, elem_id="vision-note")
            self.vision_plot = gr.Plot(plots.vision_sites_figure([]), label="Error per vision site",
                                       elem_id="vision-plot")
            with gr.Row(equal_height=True):
                self.vision_layer = gr.Slider(0, 3, value=0, step=1, label="Vision layer", elem_id="vision-layer")
                self.vision_site = gr.Dropdown(list(SITE_ROLES), value="fc1", label="Site (the input of)",
                                               elem_id="vision-site")
            self.vision_map_note = gr.Markdown("", elem_id="vision-map-note")
            self.vision_map = gr.Plot(plots.site_map_figure(None), label="|x| at the site", elem_id="vision-map")

    def events(self, model: Any) -> list[AnalysisEvent]:
        """Every action of the tab (after :meth:`layout`); ``model``: the Quantize tab's model picker, which the
        image-vs-text view measures."""
        overview = (self.info, self.partition_lead, self.partition, self.error_lead, self.errors, self.veo_lead,
                    self.veo, self.veo_note)
        ded_inputs = (self.variant, self.layer, self.n_samples)
        ded = (self.ded_lead, self.ded_plot, self.qerr_plot, self.ded_note)
        interaction_inputs = (self.variant, self.interaction_samples)
        interaction = (self.interaction_note, self.interaction_lead, self.verdict, self.interaction_table,
                       self.interaction_plot)
        vision = (self.vision_note, self.vision_lead, self.vision_plot, self.vision_layer, self.vision_site,
                  self.vision_map, self.vision_map_note)
        return [
            AnalysisEvent((), self.show_overview, (self.variant,), overview, "overview", redraw=True),
            AnalysisEvent((self.layer.release, self.n_samples.submit), self.show_ded, ded_inputs, ded, "ded",
                          redraw=True),
            AnalysisEvent((self.compute.click,), self.compute_ded, ded_inputs, ded, "compute_ded", long_job=True),
            AnalysisEvent((self.interaction_samples.submit,), self.show_interaction, interaction_inputs, interaction,
                          redraw=True),
            AnalysisEvent((self.interaction_btn.click,), self.compute_interaction, interaction_inputs, interaction,
                          "interaction", long_job=True),
            AnalysisEvent((self.modality_btn.click,), self.compute_modality, (model, self.modality_pairs),
                          (self.modality_note, self.modality_lead, self.modality_plot, self.modality_table),
                          "modality", long_job=True),
            AnalysisEvent((self.vision_btn.click,), self.compute_vision_sites, (self.variant, self.vision_samples),
                          vision, "vision_sites", long_job=True),
            AnalysisEvent((self.vision_layer.release, self.vision_site.input), self.show_vision_map,
                          (self.variant, self.vision_layer, self.vision_site, self.vision_samples),
                          (self.vision_map, self.vision_map_note)),
        ]

    @property
    def cancel_buttons(self) -> list[Any]:
        """The tab's Cancel buttons (one per long measurement); the app's one cancel handler listens to them."""
        return [self.cancel, self.interaction_cancel, self.vision_cancel]

    def select_variant(self, label: str | None, request: gr.Request | None = None) -> Outputs:
        """Offer a just-made variant in the menu, chosen, with the layer slider on its most dependent pair.

        ``label`` is None when the run made no variant: then nothing changes.
        """
        session = self.app.session(request)
        variant = session.variants.find_label(label)
        if variant is None:
            return {}
        r = variant.result
        n_layers = len(r.handle.layer_map.language)
        top = max(0, n_layers - 2)
        entropies = list(r.entropies or [])
        # start the DED plots on the most dependent pair (highest D(k,k+1)): the interesting one
        k = max(range(len(entropies)), key=entropies.__getitem__) if entropies else n_layers // 2
        return {self.variant: gr.update(choices=session.variants.labels(), value=label),
                self.layer: gr.update(maximum=top, value=min(k, top))}

    def show_overview(self, label: str | None, request: gr.Request | None = None) -> Outputs:
        """Draw the info, block partition, per-layer error and VEO loss of one held variant, each with its lead."""
        session = self.app.session(request)
        variant = session.variants.find_label(label)
        if variant is None:
            msg = "Quantize a model first (Quantize tab), then pick the variant here."
            if label:
                msg = f"The variant '{label}' is no longer held (dropped by the memory bound); pick another."
            return {self.info: f"*{msg}*", self.partition: plots.empty_figure(msg, VIEWS["partition"].title),
                    self.errors: plots.empty_figure(msg, VIEWS["errors"].title),
                    self.veo: plots.empty_figure(msg, VIEWS["veo"].title), self.veo_note: "",
                    self.partition_lead: "", self.error_lead: "", self.veo_lead: ""}
        r = variant.result
        if r.entropies:
            partition = plots.partition_figure(list(r.entropies), [list(b) for b in (r.blocks or [])],
                                               r.h0, dict(r.percentiles or {}))
        else:
            partition = plots.empty_figure(f"'{variant.label}' has no CDM step, so no block partition: "
                                           "use the qvlm or qvlm-cdm recipe.", VIEWS["partition"].title)
        compare = {v.label: list(v.result.layer_errors or []) for v in session.variants.variants(variant.base_model)}
        compare = {variant.label: compare.pop(variant.label), **compare}  # the chosen one first
        if r.veo_losses:
            outcome = veo_outcome(r.veo_holdout)
            veo_lead, veo_note = explain.veo_lead(outcome), f"*{explain.veo_sentence(outcome)}*"
        else:
            veo_lead, veo_note = no_veo_reason(r.config), ""
        cfg = r.config
        return {self.info: _variant_info(variant), self.partition: partition,
                self.partition_lead: " ".join(filter(None, (
                    explain.partition_lead(list(r.entropies or []), list(r.blocks or []), r.h0),
                    acceptance_sentence(list(r.search or []))))),
                self.errors: plots.layer_error_figure(compare),
                self.error_lead: explain.layer_error_lead(compare[variant.label]),
                self.veo: plots.veo_loss_figure(list(r.veo_losses or []), holdout=list(r.veo_holdout or []),
                                                lambdas=(cfg.veo_lambda1, cfg.veo_lambda2), empty=veo_lead),
                self.veo_lead: veo_lead, self.veo_note: veo_note}

    def show_ded(self, label: str | None, layer: Any, n_samples: Any, request: gr.Request | None = None) -> Outputs:
        """Draw DED vs entropy and vs quantization error for decoder layers (k, k+1) from a computed sweep."""
        variant = self.app.session(request).variants.find_label(label)
        if variant is None:
            msg = "Quantize a model first to see DED plots."
            return {self.ded_plot: plots.empty_figure(msg, VIEWS["ded"].title),
                    self.qerr_plot: plots.empty_figure(msg, "DED vs quantization error"), self.ded_note: "",
                    self.ded_lead: ""}
        try:
            layer_i = int(layer)
        except (TypeError, ValueError):
            return {self.ded_note: warn("The layer k must be a whole number.")}
        try:
            n = _sample_count(n_samples)
        except ValueError as err:
            return {self.ded_note: warn(str(err))}
        sweep = variant.analyses.get(n)
        if sweep is None:
            done = sorted(variant.analyses)
            msg = "Press **Compute DED** to measure it"
            if done:
                msg += f" for {n} samples (computed so far for: {', '.join(map(str, done))} samples)"
            blank = "Press 'Compute DED' to measure DED for every layer."
            return {self.ded_plot: plots.empty_figure(blank, VIEWS["ded"].title),
                    self.qerr_plot: plots.empty_figure(blank, "DED vs quantization error"),
                    self.ded_note: msg + ". " + rerun_cost(variant, n), self.ded_lead: ""}
        if layer_i not in sweep:
            return {self.ded_note: warn(f"DED is defined for layers {min(sweep)}..{max(sweep)} (pairs k, k+1).")}
        analysis = sweep[layer_i]
        points = list(analysis.points)
        block = analysis.block
        title = f"Decoder layers {block[0]}–{block[-1]}"
        return {
            self.ded_lead: explain.ded_lead(points, analysis.fit.r2, analysis.r2_chance),
            self.ded_plot: plots.ded_scatter(points, layer_i, "entropy", analysis.fit,
                                             title=f"{title}: DED vs entropy D({block[0]},{block[-1]})",
                                             r2_chance=analysis.r2_chance),
            self.qerr_plot: plots.ded_scatter(points, layer_i, "qerr", analysis.qerr_fit,
                                              title=f"{title}: DED vs quantization error", r2_chance=analysis.r2_chance),
            self.ded_note: (f"Layers {block[0]}–{block[-1]} of `{variant.label}`: {len(points)} calibration samples; "
                            "each dot is one sample, DED = its block-output error with the layer-by-layer choice "
                            "minus with the joint choice."),
        }

    def compute_ded(
        self, label: str | None, layer: Any, n_samples: Any, request: gr.Request | None = None
    ) -> Iterator[Outputs]:
        """Measure DED for every layer of a variant (streaming the stages to ``ded_note``), then draw layer k."""
        session = self.app.session(request)
        picked = picked_variant(session, label, n_samples, _sample_count)
        if isinstance(picked, str):
            yield {self.ded_note: warn(picked)}
            return
        variant, n = picked
        if n in variant.analyses:
            yield self.show_ded(label, layer, n, request)
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> dict[int, Any]:
            fp = self.app.models.get(variant.base_model)
            return {a.layer: a for a in self._ded_sweep(fp, variant.result, n_samples=n, progress=progress,
                                                        cancel=cancel)}

        def render(sweep: dict[int, Any], seconds: float) -> tuple[str, Outputs]:
            variant.analyses[n] = sweep
            shown = self.show_ded(label, layer, n, request)
            return f"✓ Done in {seconds:.1f} s. " + shown.pop(self.ded_note), shown

        yield from stream_job(LongJob(
            name="DED analysis", title=f"DED analysis of {variant.label} on {n} samples",
            holder=f"a DED analysis ({variant.label})", work=work, render=render,
            cancelled="■ Cancelled. The plots you had are unchanged.",
        ), session, self.ded_note)

    def compute_modality(self, model_name: str, n_pairs: Any, request: gr.Request | None = None) -> Iterator[Outputs]:
        """|x| of image and of text tokens at every decoder layer's input of the FP model (a short long job)."""
        session = self.app.session(request)
        base = canonical_name(model_name)
        try:
            pairs = parse_count(n_pairs, 1, MODALITY_MAX_PAIRS, "Calibration pairs")
        except ValueError as err:
            yield {self.modality_note: warn(str(err))}
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> list[ModalityRow]:
            fp = self.app.models.get(base)
            return self._modality_stats(fp, n_pairs=pairs, progress=progress, cancel=cancel)

        def render(rows: list[ModalityRow], seconds: float) -> tuple[str, Outputs]:
            table = [[f"L{r.layer}", *(round(v, 3) for v in (r.image.p, r.image.max, r.text.p, r.text.max)), r.ratio]
                     for r in rows]
            line = (f"✓ {pairs} calibration pairs ({rows[0].image.tokens} image and {rows[0].text.tokens} text "
                    f"tokens) in {seconds:.1f} s.") if rows else "✓ No decoder layers found."
            return line, {self.modality_plot: plots.modality_figure(rows), self.modality_table: table,
                          self.modality_lead: explain.modality_lead(rows)}

        yield from stream_job(LongJob(
            name="modality statistics", title=f"Image vs text tokens of {base} on {pairs} calibration pairs",
            holder="a modality measurement", work=work, render=render,
        ), session, self.modality_note)

    def show_interaction(self, label: str | None, n_samples: Any, request: gr.Request | None = None) -> Outputs:
        """Draw the verdict, the per-pair table and the interaction chart of a variant from its cache."""
        variant = self.app.session(request).variants.find_label(label)
        if variant is None:
            return {self.interaction_note: "", self.verdict: "", self.interaction_table: [], self.interaction_lead: "",
                    self.interaction_plot: plots.interaction_figure([], INTERACTION_THRESHOLD)}
        try:
            n = _sample_count(n_samples)
        except ValueError as err:
            return {self.interaction_note: warn(str(err))}
        report = variant.interactions.get(n)
        if report is None:
            done = sorted(variant.interactions)
            note = f"Press **Do the layers interact?** to measure every decoder pair of `{variant.label}` on {n} samples"
            if done:
                note += f" (measured so far for: {', '.join(map(str, done))} samples)"
            return {self.interaction_note: f"{note}. {rerun_cost(variant, n)}",
                    self.verdict: "", self.interaction_table: [], self.interaction_lead: "",
                    self.interaction_plot: plots.interaction_figure([], INTERACTION_THRESHOLD)}
        pairs = report.summaries
        return {self.interaction_note: f"Every adjacent decoder pair of `{variant.label}` on {n} calibration samples.",
                self.interaction_lead: explain.interaction_lead(pairs),
                self.verdict: f"### Verdict\n\n**{report.verdict}**",
                self.interaction_table: [_interaction_row(p) for p in pairs],
                self.interaction_plot: plots.interaction_figure(pairs, INTERACTION_THRESHOLD)}

    def compute_interaction(self, label: str | None, n_samples: Any,
                            request: gr.Request | None = None) -> Iterator[Outputs]:
        """Run the dependency diagnostics of every adjacent decoder pair (a long job), then draw them."""
        session = self.app.session(request)
        picked = picked_variant(session, label, n_samples, _sample_count)
        if isinstance(picked, str):
            yield {self.interaction_note: warn(picked)}
            return
        variant, n = picked
        if n in variant.interactions:
            yield self.show_interaction(label, n, request)
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> Any:
            fp = self.app.models.get(variant.base_model)
            return self._diagnostics(fp, variant.result, n_samples=n, progress=progress, cancel=cancel)

        def render(report: Any, seconds: float) -> tuple[str, Outputs]:
            variant.interactions[n] = report
            # the diagnostics are the full DED sweep: keep it, so 'Compute DED' for n samples is instant
            variant.analyses.setdefault(n, {p.layer: p for p in report.pairs})
            shown = self.show_interaction(label, n, request)
            return f"✓ Done in {seconds:.1f} s. " + shown.pop(self.interaction_note), shown

        yield from stream_job(LongJob(
            name="dependency analysis", title=f"Do the layers of {variant.label} interact? ({n} samples)",
            holder=f"a dependency analysis ({variant.label})", work=work, render=render,
            cancelled="■ Cancelled. The verdict and table you had are unchanged.",
        ), session, self.interaction_note)

    def compute_vision_sites(self, label: str | None, n_samples: Any,
                             request: gr.Request | None = None) -> Iterator[Outputs]:
        """Measure the error each vision site adds alone, then draw it and the |x| map of the worst site."""
        session = self.app.session(request)
        picked = picked_variant(session, label, n_samples,
                                lambda v: parse_count(v, *SITE_SAMPLES, "Calibration pairs"))
        if isinstance(picked, str):
            yield {self.vision_note: warn(picked)}
            return
        variant, n = picked

        def work(progress: ProgressCallback, cancel: threading.Event) -> Any:
            fp = self.app.models.get(variant.base_model)
            found = self._vision_sites(fp, variant.result, n_samples=n, progress=progress, cancel=cancel)
            worst = found.worst()
            return found, site_activation_map(fp, worst.layer, worst.site, found.a_bits, n_samples=n)

        def render(measured: Any, seconds: float) -> tuple[str, Outputs]:
            found, site_map = measured
            worst = found.worst()
            n_layers = len(variant.result.handle.layer_map.vision)
            return (f"✓ Done in {seconds:.1f} s on {found.samples} calibration pairs. Weights {found.weights}; "
                    f"weights alone: {100 * found.weights_only:.3g}% error, every vision site on: "
                    f"{100 * found.all_on:.3g}%."), {
                self.vision_lead: explain.vision_sites_lead(found.rows),
                self.vision_plot: plots.vision_sites_figure(found.rows, found.all_on),
                self.vision_layer: gr.update(maximum=n_layers - 1, value=worst.layer),
                self.vision_site: worst.site,
                self.vision_map: plots.site_map_figure(site_map),
                self.vision_map_note: explain.site_map_sentence(site_map)}

        yield from stream_job(LongJob(
            name="vision-site measurement", title=f"Where does {variant.label}'s vision tower lose? ({n} pairs)",
            holder=f"a vision-site measurement ({variant.label})", work=work, render=render,
            cancelled="■ Cancelled. The variant answers as before.",
        ), session, self.vision_note)

    def show_vision_map(self, label: str | None, layer: Any, site: str, n_samples: Any,
                        request: gr.Request | None = None) -> Outputs:
        """Draw |x| at one vision site of the variant's FP model (one vision pass) with its per-token and
        per-channel ranges at the variant's vision activation bits."""
        variant = self.app.session(request).variants.find_label(label)
        if variant is None:
            return {self.vision_map_note: warn("Quantize a model first, then pick the variant to analyse.")}
        try:
            n = parse_count(n_samples, *SITE_SAMPLES, "Calibration pairs")
            site_map = site_activation_map(self.app.models.get(variant.base_model), int(layer), site,
                                           variant.result.config.tower_bits("vision")[1], n_samples=n)
        except (TypeError, ValueError) as err:
            return {self.vision_map_note: warn(str(err))}
        return {self.vision_map: plots.site_map_figure(site_map),
                self.vision_map_note: explain.site_map_sentence(site_map)}


def _interaction_row(p: PairSummary) -> list[str]:
    """One table row from a ``DEDAnalysis.summary()``: numbers as the reader wants them."""
    def pct(x: Any) -> str:
        return "—" if x is None else f"{100 * float(x):.1f}"

    def num(x: Any, digits: int = 3) -> str:
        return "—" if x is None else f"{float(x):.{digits}g}"

    return [f"L{p.block[0]}–L{p.block[-1]}", pct(p.interaction_share), "yes" if p.joint_equals_greedy else "no",
            pct(p.zero_ded_fraction), num(p.ded_relative), pct(p.controllable_share), num(p.gain),
            num(p.branch_response), f"{p.r2_entropy:.3f}", f"{p.r2_chance:.3f}"]


def no_veo_reason(cfg: QuantConfig) -> str:
    """Why a variant has no VEO loss to show, from its config: the first reason that applies."""
    if not cfg.quantize_vision:
        return ("No VEO in this variant: its vision tower stays in full precision, so it has no vision quantizers "
                "for VEO to tune.")
    if not any(stage.name == STAGE_VEO for stage in get_recipe(cfg.recipe).stages):
        return f"No VEO in this variant: the '{cfg.recipe}' recipe has no VEO step ('qvlm' and 'qvlm-veo' have one)."
    if not cfg.veo_epochs:
        return "No VEO in this variant: it ran with 0 VEO epochs."
    return "No VEO in this variant: VEO logged no optimizer step."


def rerun_cost(v: Variant, n: int) -> str:
    """What pressing a DED button costs, from the variant's own init time (no guessed durations)."""
    cfg = v.result.config
    init_s = (v.result.timings or {}).get(STAGE_INIT)
    took = (f" (in the quantization, the init took {init_s:.1f} s on {cfg.calib_size} calibration pairs)"
            if init_s else "")
    return f"It re-runs the layer-wise init on {n} samples{took}, then a joint search per decoder pair."


def _variant_info(v: Variant) -> str:
    """The Markdown above the partition: what the variant is, and how its layers were grouped."""
    r = v.result
    blocks = r.blocks or []
    parts = [f"**{v.label}** · quantized in {v.seconds:.1f} s · "
             f"{human_bytes(v.nbytes)} in memory"]
    if not r.entropies:
        parts.append(f"The `{r.config.recipe}` recipe has no CDM step: no D(k,k+1) was measured and every decoder "
                     "layer keeps its own (layer-wise) range. Quantize with `qvlm` or `qvlm-cdm` to see a partition.")
    elif blocks:
        sizes = ", ".join(f"[{b[0]}–{b[-1]}]" if len(b) > 1 else f"[{b[0]}]" for b in blocks)
        h0 = f"{r.h0:.4g}" if isinstance(r.h0, (int, float)) else "—"
        parts.append(f"{len(blocks)} blocks over {sum(len(b) for b in blocks)} decoder layers: {sizes}; h0 = {h0}.")
    return "\n\n".join(parts)
