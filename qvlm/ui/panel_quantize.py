"""Quantize tab: the form that becomes a ``QuantConfig``, a run with live progress by stage, the held variants.

The recipe menu, its labels, the presets, the bit settings and every default shown come from the core
(``qvlm.quant``); the form only turns text into values and shows what ``QuantConfig.validate()``
says is wrong. Under the form, the preset line (where the config departs from its preset) and the
expected time (measured costs, :mod:`qvlm.ui.run_size`) follow every change. A run streams its stages from a worker thread (:func:`~qvlm.ui.jobs.stream_job`) and
on success adds the variant to the session's LRU store, announcing any variant the bound drops.
Below the result, the Download group writes the latest variant as a zip in a chosen export format
and the run as JSON (:mod:`qvlm.ui.downloads`) into the session's temporary folder.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from qvlm.export import FORMAT_NAME, SAVE_FORMATS
from qvlm.models import BUNDLED_MODELS, ModelLoadError
from qvlm.utils.progress import ProgressCallback
from qvlm.quant import BIT_SETTINGS, MENU_ORDER, PRESETS, QuantConfig, QuantResult, get_recipe, quantize
from qvlm.quant.config import parse_bits
from qvlm.quant.presets import DEFAULT_PRESET
from qvlm.ui import texts
from qvlm.ui.downloads import (
    download_summary,
    failure_message,
    format_menu,
    run_record,
    write_model_zip,
    write_run_json,
)
from qvlm.ui.feedback import Outputs, warn
from qvlm.ui.jobs import LongJob, stream_job
from qvlm.utils.progress import STAGE_LOAD
from qvlm.ui.render import human_bytes, variants_markdown
from qvlm.ui.run_size import DEFAULT_RUN_SIZE, RUN_SIZES, expected_time
from qvlm.ui.state import AppState, SessionState, Variant, canonical_name, module_bytes, session_files_root

FIRST_RUN_CALIB_PAIRS = RUN_SIZES[DEFAULT_RUN_SIZE].calib_size
"""The form starts at the quick run size's calibration pairs, not ``QuantConfig``'s 64 (the paper's):
see :data:`qvlm.ui.run_size.RUN_SIZES` for the measurements behind it."""

SAME_BITS = "same"
"""The Vision bits menu's value for "the run's own bits" (``vision_w_bits``/``vision_a_bits`` None)."""
VISION_BITS = tuple(dict.fromkeys(("W8A8", "W6A6", "W4A8", *BIT_SETTINGS)))
"""Offered for the vision tower besides "same as the run"; any WxAy the config accepts may be typed."""

MAX_PERCENTILES = 20
"""The joint search tries up to |grid|^depth combinations per block; a longer grid would tie up
the app's shared CPU for minutes."""

H0_SUGGESTIONS = ("mean", "median", "quantile:0.75")
"""Offered in the h0 menu; any rule ``QuantConfig.h0_rule`` accepts, or a bare number, may be typed."""

QuantizeFn = Callable[..., QuantResult]


def parse_percentiles(text: str | None) -> tuple[float, ...]:
    """"1.0, 0.995 0.99;0.98" -> (1.0, 0.995, 0.99, 0.98); which values are allowed is the config's call."""
    tokens = [t for t in re.split(r"[,\s;]+", (text or "").strip()) if t]
    values = []
    for t in tokens:
        try:
            values.append(float(t))
        except ValueError:
            raise ValueError(f"Percentile grid: '{t}' is not a number.") from None
    if len(values) > MAX_PERCENTILES:
        raise ValueError(f"The percentile grid has {len(values)} values; at most {MAX_PERCENTILES} keep the "
                         "search fast.")
    return tuple(values)


def parse_h0_rule(text: str | None) -> str:
    """The h0 field as ``QuantConfig`` spells it: a bare number is a fixed threshold ("0.25" -> "value:0.25")."""
    rule = (text or "").strip().lower()
    try:
        return f"value:{float(rule):g}"
    except ValueError:
        return rule


def whole_number(value: Any) -> Any:
    """8.0 -> 8 (number boxes and sliders may send floats); anything else unchanged, for the config to judge."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_from_form(
    bits: str, recipe: str, calib_size: Any, max_block_depth: Any, h0_rule: str, percentiles: str,
    veo_epochs: Any, veo_eta: Any, veo_lambda1: Any, veo_lambda2: Any,
    quantize_vision: Any = None, quantize_projector: Any = None, preset: str | None = None,
    vision_bits: str | None = None,
) -> QuantConfig:
    """The form's ``QuantConfig``; a ValueError with the config's own message for any bad field.

    ``quantize_vision`` / ``quantize_projector`` left None keep the preset's values; ``preset`` None is the
    default preset; ``vision_bits`` None or "same" leaves the vision tower at the run's bits.
    """
    switches = {name: value for name, value in (("quantize_vision", quantize_vision),
                                                ("quantize_projector", quantize_projector)) if value is not None}
    if vision_bits and vision_bits != SAME_BITS:
        switches["vision_w_bits"], switches["vision_a_bits"] = parse_bits(vision_bits)
    return QuantConfig.from_bits(
        bits, recipe=recipe, preset=preset or DEFAULT_PRESET, calib_size=whole_number(calib_size),
        max_block_depth=whole_number(max_block_depth), h0_rule=parse_h0_rule(h0_rule),
        percentiles=parse_percentiles(percentiles), veo_epochs=whole_number(veo_epochs),
        veo_eta=veo_eta, veo_lambda1=veo_lambda1, veo_lambda2=veo_lambda2, **switches,
    )


def preset_line(cfg: QuantConfig) -> str:
    """"Preset: recommended · differs in: act_granularity_vision = token (preset: channel)", from the config itself."""
    differences = cfg.preset_differences()
    line = f"Preset: {cfg.preset}"
    if differences:
        line += " · differs in: " + ", ".join(f"{name} = {_shown(mine)} (preset: {_shown(theirs)})"
                                             for name, (theirs, mine) in differences.items())
    return line


def _shown(value: Any) -> str:
    """A config value as the preset line writes it: lists as "1, 0.99", None as "the run's"."""
    if value is None:
        return "the run's"
    if isinstance(value, list):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def quantized_parts(cfg: QuantConfig) -> str:
    """Which towers the run quantizes, in words: "LLM + vision", "LLM only", "LLM + vision + projector"."""
    parts = [name for name, on in (("LLM", cfg.quantize_language), ("vision", cfg.quantize_vision),
                                   ("projector", cfg.quantize_projector)) if on]
    return " + ".join(parts) + (" only" if len(parts) == 1 else "") if parts else "nothing"


def model_short_name(model: str) -> str:
    """"tiny-llava-mosaic" for the bundled model's display name, a folder's or hub id's last part otherwise."""
    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model].name
    return model.rstrip("/").rsplit("/", 1)[-1]


def variant_label(cfg: QuantConfig, model: str = "") -> str:
    """"tiny-llava-mosaic W4A4 qvlm": the model, then the bits and recipe, with the towers named when they differ
    from ``QuantConfig``'s defaults ("tiny-llava W4A4 qvlm · vision FP"), the preset when it is not the default
    ("· paper preset") and the vision tower's own bits (``bits_label``: "W4A4 (vision W8A8)").

    ``model``: the canonical model name; a folder or hub id is shown by its last part. Why the model: a
    session may hold variants of two models, and "W4A4 qvlm #2" does not say which is which.
    """
    defaults = QuantConfig()
    label = f"{model_short_name(model)} {cfg.bits_label} {cfg.recipe}".strip()
    if cfg.preset != defaults.preset:
        label += f" · {cfg.preset} preset"
    if cfg.quantize_vision != defaults.quantize_vision:
        label += " · vision " + (cfg.bits_label if cfg.quantize_vision else "FP")
    if cfg.quantize_projector != defaults.quantize_projector:
        label += " · projector " + (cfg.bits_label if cfg.quantize_projector else "FP")
    return label


def config_key(model: str, cfg: QuantConfig) -> str:
    """Two runs with this key would give the same variant: the model and every config field."""
    return json.dumps({"model": model, **cfg.to_dict()}, sort_keys=True, default=str)


class QuantizePanel:
    """The Quantize tab: its components (made by :meth:`layout`) and its handlers.

    ``quantize`` is the core's :func:`qvlm.quant.quantize`; a test passes a stand-in with the same
    signature to check the job handling in a fraction of a second.
    """

    def __init__(self, app: AppState, quantize: QuantizeFn = quantize) -> None:
        self.app = app
        self._core_quantize = quantize

    def layout(self) -> None:
        """The tab's components, top to bottom; handlers read and write them by attribute."""
        defaults = QuantConfig()
        settings = self.app.settings
        with gr.Row():
            self.model = gr.Dropdown(settings.model_choices(), value=settings.default_model, label="Model",
                                     info="The bundled tiny LLaVA, an allowed local folder, or a hub LLaVA id.",
                                     allow_custom_value=True, elem_id="model", scale=3)
            self.bits = gr.Radio(list(BIT_SETTINGS), value=defaults.bits_label,
                                 label="Bit-width (weights / activations)", elem_id="bits", scale=2)
            self.recipe = gr.Dropdown([(get_recipe(name).label, name) for name in MENU_ORDER], value=defaults.recipe,
                                      label="Recipe", elem_id="recipe", scale=2)
        with gr.Row():
            with gr.Column(scale=3):
                self.preset = gr.Radio([(p.label, p.name) for p in PRESETS.values()], value=defaults.preset,
                                       label="Preset (where the settings come from)", elem_id="preset")
                gr.Markdown("\n".join(f"- **{p.label}**: {p.description}" for p in PRESETS.values()),
                            elem_id="preset-help")
            self.vision_bits = gr.Dropdown([("same as the run", SAME_BITS), *VISION_BITS], value=SAME_BITS,
                                           allow_custom_value=True, label="Vision bits (vision tower's W/A)",
                                           elem_id="vision-bits", scale=1)
            self.run_size = gr.Radio([(s.name, s.name) for s in RUN_SIZES.values()], value=DEFAULT_RUN_SIZE,
                                     label="Run size", elem_id="run-size", scale=1,
                                     info="; ".join(f"{s.name}: {s.description}" for s in RUN_SIZES.values()))
        with gr.Accordion("Advanced: QuantConfig", open=False, elem_id="advanced"):
            with gr.Row():
                self.calib_size = gr.Number(RUN_SIZES[DEFAULT_RUN_SIZE].calib_size,
                                            label="Calibration pairs (the model's train split)",
                                            minimum=1, maximum=256, elem_id="calib-size")
                self.max_block_depth = gr.Slider(1, 6, value=defaults.max_block_depth, step=1,
                                                 label="Max block depth (layers per block)", elem_id="max-depth")
                self.h0_rule = gr.Dropdown(list(H0_SUGGESTIONS), value=defaults.h0_rule, allow_custom_value=True,
                                           label="h0 rule (threshold on D(k,k+1); 'mean', 'median' or a number)",
                                           elem_id="h0-rule")
            self.percentiles = gr.Textbox(", ".join(f"{p:g}" for p in defaults.percentiles),
                                          label="Percentile grid searched per layer", elem_id="percentiles")
            with gr.Row():
                self.veo_epochs = gr.Number(RUN_SIZES[DEFAULT_RUN_SIZE].veo_epochs, minimum=0, maximum=100,
                                            label="VEO epochs", elem_id="veo-epochs")
                self.veo_eta = gr.Number(defaults.veo_eta, label="η (LLM-output error weight)", elem_id="veo-eta")
                self.veo_lambda1 = gr.Number(defaults.veo_lambda1, label="λ1 (entropy term)", elem_id="veo-l1")
                self.veo_lambda2 = gr.Number(defaults.veo_lambda2, label="λ2 (error term)", elem_id="veo-l2")
        with gr.Row():
            self.quantize_vision = gr.Checkbox(defaults.quantize_vision, label="Quantize the vision tower",
                                               info="Off: the vision encoder stays FP (VEO then has nothing to tune).",
                                               elem_id="quantize-vision")
            self.quantize_projector = gr.Checkbox(defaults.quantize_projector, label="Quantize the projector",
                                                  info="The image-to-LLM projector; kept FP by the authors' code.",
                                                  elem_id="quantize-projector")
        self.preset_line = gr.Markdown(elem_id="preset-line")
        self.estimate = gr.Markdown(elem_id="run-estimate")
        with gr.Row():
            self.start = gr.Button("Start quantization", variant="primary", elem_id="start-btn")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
        self.status = gr.Markdown("*Pick a model and a bit-width, then press **Start quantization**.*",
                                  elem_id="quant-status")
        self.held = gr.Markdown(variants_markdown([], settings.variant_budget_bytes, settings.max_variants),
                                elem_id="held-variants")
        self.new_variant = gr.State(None)  # the label of the variant the last run made; None when it made none
        with gr.Group(elem_id="download"):
            gr.Markdown(texts.DOWNLOAD_HELP, elem_id="download-help")
            with gr.Row():
                self.export_format = gr.Dropdown([(texts.EXPORT_FORMATS.get(f, f), f) for f in SAVE_FORMATS],
                                                 value=FORMAT_NAME, label="Format", elem_id="export-format", scale=3,
                                                 info=texts.DOWNLOAD_FORMAT_INFO)
                self.download_btn = gr.Button("Prepare download", elem_id="download-btn", scale=1)
            with gr.Row():
                self.model_file = gr.File(label="Quantized model (zip)", interactive=False, elem_id="model-file")
                self.run_file = gr.File(label="Run: config, statistics, evaluation (JSON)", interactive=False,
                                        elem_id="run-file")
            self.download_note = gr.Markdown(elem_id="download-note")

    @property
    def downloads(self) -> list[gr.components.Component]:
        """The outputs of :meth:`download`."""
        return [self.model_file, self.run_file, self.download_note]

    @property
    def form(self) -> list[gr.components.Component]:
        """The inputs of :meth:`quantize`, in its argument order."""
        return [self.model, self.bits, self.recipe, self.calib_size, self.max_block_depth, self.h0_rule,
                self.percentiles, self.veo_epochs, self.veo_eta, self.veo_lambda1, self.veo_lambda2,
                self.quantize_vision, self.quantize_projector, self.preset, self.vision_bits]

    def describe_form(self, model_name: str, *form: Any) -> Outputs:
        """The preset line and the expected time of the config the form would run (no model is touched).

        ``form``: the rest of :attr:`form`, then the run size. A form the config refuses shows its reason.
        """
        *values, run_size = form
        try:
            cfg = config_from_form(*values)
        except ValueError as err:
            return {self.preset_line: warn(str(err)), self.estimate: ""}
        return {self.preset_line: preset_line(cfg),
                self.estimate: expected_time(model_short_name(canonical_name(model_name)), cfg.recipe, run_size,
                                             cfg.calib_size, cfg.veo_epochs)}

    def choose_run_size(self, run_size: str) -> Outputs:
        """Set the form's calibration pairs and VEO epochs to the run size's (the user may still edit them)."""
        size = RUN_SIZES[run_size]
        return {self.calib_size: size.calib_size, self.veo_epochs: size.veo_epochs}

    def quantize(
        self, model_name: str, bits: str, recipe: str, calib_size: Any, max_block_depth: Any, h0_rule: str,
        percentiles: str, veo_epochs: Any, veo_eta: Any, veo_lambda1: Any, veo_lambda2: Any,
        quantize_vision: Any = None, quantize_projector: Any = None, preset: str | None = None,
        vision_bits: str | None = None, request: gr.Request | None = None,
    ) -> Iterator[Outputs]:
        """Quantize the chosen model, streaming its stages to ``status``; the new variant's label goes to
        ``new_variant`` (None when the run made none), from where the Analysis tab opens it."""
        session = self.app.session(request)
        try:
            cfg = config_from_form(bits, recipe, calib_size, max_block_depth, h0_rule, percentiles, veo_epochs,
                                   veo_eta, veo_lambda1, veo_lambda2, quantize_vision, quantize_projector, preset,
                                   vision_bits)
        except ValueError as err:
            yield {self.status: warn(str(err)), self.new_variant: None}
            return
        base = canonical_name(model_name)
        key = config_key(base, cfg)
        existing = session.variants.get(key, touch=False)
        label = existing.label if existing else session.variants.unique_label(variant_label(cfg, base))

        def work(progress: ProgressCallback, cancel: threading.Event) -> QuantResult:
            progress(STAGE_LOAD, 0.0, f"loading {base}")
            fp = self.app.models.get(base)
            progress(STAGE_LOAD, 1.0, f"{fp.name} loaded")
            return self._core_quantize(fp, cfg, progress=progress, cancel=cancel)

        def render(result: QuantResult, seconds: float) -> tuple[str, Outputs]:
            evicted = session.variants.add(Variant(key=key, label=label, base_model=base, result=result,
                                                   nbytes=module_bytes(result.handle.model), seconds=seconds))
            lines = [f"✓ **{label}** ready in {seconds:.1f} s. See the **Analysis**, **Ask** and **Results** tabs.",
                     preset_line(cfg)]
            if existing:
                lines.append(f"(It replaced the earlier `{label}` with the same settings.)")
            for old in evicted:
                msg = (f"Memory bound reached: dropped the least recently used variant '{old.label}' "
                       f"({human_bytes(old.nbytes)}) to keep this session within its limit.")
                gr.Info(msg)
                lines.append(f"ℹ {msg}")
            return "\n\n".join(lines), {self.held: self._held_markdown(session), self.new_variant: label}

        yield from stream_job(LongJob(
            name="quantization", title=f"Quantizing {label} ({cfg.calib_size} calibration pairs)",
            holder=f"a quantization ({label})", work=work, render=render,
            cancelled="■ Cancelled. Nothing changed: the variants you hold are all still here.",
            stopped=lambda: {self.held: self._held_markdown(session), self.new_variant: None},
        ), session, self.status)

    def download(self, fmt: str, request: gr.Request | None = None) -> Outputs:
        """Write the session's latest variant as a zip in ``fmt`` and its run as JSON; show both with their sizes.

        The files go to the session's temporary folder inside Gradio's cache folder, which Gradio then
        serves where it is instead of copying it, so ending the session removes the only copy. A format
        that cannot hold the recipe, or no variant yet, is a warning; the files shown before stay.
        """
        session = self.app.session(request)
        held = session.variants.variants()
        if not held:
            return {self.download_note: warn(texts.NO_VARIANT_TO_DOWNLOAD)}
        variant = held[-1]  # the store's order is the order runs finished: nothing else reorders it
        folder = session.files_dir(session_files_root())
        try:  # the run JSON first: it can always be written, and stays downloadable when the format is refused
            run_json = write_run_json(variant, run_record(variant, session.fp_evals), folder)
            model_zip, sizes = write_model_zip(variant, fmt, folder, self.fp_reference(variant))
        except ValueError as err:  # the exporter's own sentence (export_refusal): the format cannot hold this variant
            return {self.run_file: str(run_json), self.download_note: warn(str(err))}
        except OSError as err:  # a full or read-only disk
            return {self.download_note: warn(failure_message(err))}
        return {self.model_file: str(model_zip), self.run_file: str(run_json),
                self.download_note: download_summary(variant.label, fmt, model_zip, run_json, sizes)}

    def fp_reference(self, variant: Variant) -> Any | None:
        """The variant's FP model, the reference its measured bytes are compared with; None when it cannot be loaded
        now (the download goes on without the comparison)."""
        try:
            return self.app.models.get(variant.base_model).model
        except ModelLoadError:
            return None

    def offer_formats(self, request: gr.Request | None = None) -> gr.Dropdown:
        """The format menu for the session's latest variant: only the formats it can be written in, and in the
        menu's info line why the others are missing (:func:`~qvlm.ui.downloads.format_menu`)."""
        held = self.app.session(request).variants.variants()
        choices, value, info = format_menu(held[-1].result.config if held else None)
        return gr.Dropdown(choices=choices, value=value, info=info or texts.DOWNLOAD_FORMAT_INFO)

    def show_held(self, request: gr.Request | None = None) -> str:
        """The session's held variants, for the page load (a reload keeps them)."""
        return self._held_markdown(self.app.session(request))

    def _held_markdown(self, session: SessionState) -> str:
        rows = [(v.label, v.seconds, v.nbytes) for v in session.variants.variants()]
        return variants_markdown(rows, self.app.settings.variant_budget_bytes, self.app.settings.max_variants)
