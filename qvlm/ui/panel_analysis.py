"""Analysis panel: block partition, per-layer error, VEO loss, and DED vs entropy / quantization error.

The partition, errors and losses come with the quantization result and draw instantly; the
DED needs its own measurement (a rebuild of the layer-wise init plus a search per sample), so
it runs on request for every layer at once and is then browsed by layer from the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from qvlm import plots
from qvlm.models import ModelLoadError
from qvlm.ui import quant_bridge as qb
from qvlm.ui.feedback import SKIP, end_heavy_work, unexpected, warn
from qvlm.ui.jobs import BackgroundJob, HeavyWorkTurn
from qvlm.ui.panel_base import PanelBase
from qvlm.ui.progress_view import StageTracker
from qvlm.ui.render import human_bytes
from qvlm.ui.state import Variant


class AnalysisPanel(PanelBase):
    """Handlers of the Analysis tab."""

    def overview(self, label: str | None, request: gr.Request | None = None) -> tuple[Any, ...]:
        """(info, partition figure, per-layer error figure, VEO loss figure) for one held variant."""
        session = self.session(request)
        variant = session.variants.find_label(label) if label else None
        if variant is None:
            msg = "Quantize a model first (Quantize tab), then pick the variant here."
            if label:
                msg = f"The variant '{label}' is no longer held (dropped by the memory bound); pick another."
            return (f"*{msg}*", plots.empty_figure(msg, "Block partition"),
                    plots.empty_figure(msg, "Per-layer error"), plots.empty_figure(msg, "VEO loss"))
        r = variant.result
        if r.entropies:
            partition = plots.partition_figure(list(r.entropies), [list(b) for b in (r.blocks or [])],
                                               r.h0, dict(r.percentiles or {}))
        else:
            partition = plots.empty_figure(f"'{variant.label}' has no CDM step, so no block partition: "
                                           "use the qvlm or qvlm-cdm recipe.", "Block partition")
        compare = {v.label: list(v.result.layer_errors or []) for v in session.variants.variants(variant.base_model)}
        compare = {variant.label: compare.pop(variant.label), **compare}  # the chosen one first
        errors = plots.layer_error_figure(compare)
        veo = plots.veo_loss_figure(list(r.veo_losses or []))
        return _variant_info(variant), partition, errors, veo

    def ded(self, label: str | None, layer: Any, n_samples: Any, request: gr.Request | None = None) -> tuple[Any, ...]:
        """(entropy-vs-DED figure, qerr-vs-DED figure, note) for one decoder layer, from computed sweeps."""
        session = self.session(request)
        variant = session.variants.find_label(label) if label else None
        if variant is None:
            msg = "Quantize a model first to see DED plots."
            return plots.empty_figure(msg, "DED vs entropy"), plots.empty_figure(msg, "DED vs quantization error"), ""
        try:
            layer_i, n = int(layer), int(n_samples)
        except (TypeError, ValueError):
            return SKIP(), SKIP(), warn("Layer and number of samples must be whole numbers.")
        sweep = variant.analyses.get(n)
        if sweep is None:
            done = sorted(variant.analyses)
            msg = "Press **Compute DED** to measure it"
            if done:
                msg += f" for {n} samples (computed so far for: {', '.join(map(str, done))} samples)"
            init_s = (getattr(variant.result, "timings", None) or {}).get("init")
            cost = f" It re-runs the layer-wise init on {n} samples (the init took {init_s:.0f} s)." if init_s else ""
            blank = "Press 'Compute DED' to measure DED for every layer."
            return (plots.empty_figure(blank, "DED vs entropy"), plots.empty_figure(blank, "DED vs quantization error"),
                    msg + "." + cost)
        if layer_i not in sweep:
            return SKIP(), SKIP(), warn(f"DED is defined for layers {min(sweep)}..{max(sweep)} (pairs k, k+1).")
        analysis = sweep[layer_i]
        points = list(analysis.points)
        block = getattr(analysis, "block", [layer_i, layer_i + 1])
        title = f"Decoder layers {block[0]}–{block[-1]}"
        ded_fig = plots.ded_scatter(points, layer_i, "entropy", getattr(analysis, "fit", None),
                                    title=f"{title}: DED vs entropy D({block[0]},{block[-1]})")
        qerr_fig = plots.ded_scatter(points, layer_i, "qerr", getattr(analysis, "qerr_fit", None),
                                     title=f"{title}: DED vs quantization error")
        note = (f"Layers {block[0]}–{block[-1]} of `{variant.label}`: {len(points)} calibration samples; each dot is "
                "one sample, DED = its block-output error with the layer-by-layer choice minus with the joint choice.")
        return ded_fig, qerr_fig, note

    def compute_ded(
        self, label: str | None, layer: Any, n_samples: Any, request: gr.Request | None = None
    ) -> Iterator[tuple[Any, Any, Any]]:
        """Stream (note, entropy-vs-DED, qerr-vs-DED) while measuring DED for every layer of a variant."""
        session = self.session(request)
        variant = session.variants.find_label(label) if label else None
        if variant is None:
            yield warn("Quantize a model first, then pick the variant to analyse."), SKIP(), SKIP()
            return
        try:
            n = int(n_samples)
            if not 2 <= n <= 64:
                raise ValueError
        except (TypeError, ValueError):
            yield warn("DED samples must be a whole number from 2 to 64."), SKIP(), SKIP()
            return
        if n in variant.analyses:
            ded_fig, qerr_fig, note = self.ded(label, layer, n, request)
            yield note, ded_fig, qerr_fig
            return
        if not session.begin("DED analysis"):
            yield warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
                SKIP(), SKIP()
            return
        tracker = StageTracker(f"DED analysis of {variant.label} on {n} samples")
        job: BackgroundJob | None = None
        locked = False
        try:
            fp = self.models.get(variant.base_model)
            turn = HeavyWorkTurn(f"a DED analysis ({variant.label})", tracker, session.cancel, waiting_tail=".")
            for status in turn:
                yield status, SKIP(), SKIP()
            if not (locked := turn.acquired):
                return
            job = BackgroundJob(lambda cb: qb.ded_sweep(fp, variant.result, n, cb, session.cancel)).start()
            for events in job.poll():
                tracker.update(events)
                yield tracker.markdown(), SKIP(), SKIP()
            variant.analyses[n] = job.outcome()
        except qb.cancelled_types():
            yield tracker.markdown("■ Cancelled. The plots you had are unchanged."), SKIP(), SKIP()
            return
        except (ModelLoadError, ValueError) as err:
            yield tracker.markdown(warn(str(err))), SKIP(), SKIP()
            return
        except Exception as err:  # noqa: BLE001
            yield tracker.markdown(unexpected("The DED analysis", err)), SKIP(), SKIP()
            return
        finally:
            end_heavy_work(session, job, locked)
        ded_fig, qerr_fig, note = self.ded(label, layer, n, request)
        yield tracker.markdown(f"✓ Done in {job.elapsed:.1f} s. " + note), ded_fig, qerr_fig

    def variant_choices(self, request: gr.Request | None = None) -> Any:
        labels = self.session(request).variants.labels()
        return gr.update(choices=labels, value=labels[-1] if labels else None)


def _variant_info(v: Variant) -> str:
    r = v.result
    blocks = r.blocks or []
    parts = [f"**{v.label}** of `{v.base_model}` · quantized in {v.seconds:.1f} s · {human_bytes(v.nbytes)} in memory"]
    if not r.entropies:
        parts.append(f"The `{r.config.recipe}` recipe has no CDM step: no D(k,k+1) was measured and every decoder "
                     "layer keeps its own (layer-wise) range. Quantize with `qvlm` or `qvlm-cdm` to see a partition.")
    elif blocks:
        sizes = ", ".join(f"[{b[0]}–{b[-1]}]" if len(b) > 1 else f"[{b[0]}]" for b in blocks)
        h0 = f"{r.h0:.4g}" if isinstance(r.h0, (int, float)) else "—"
        parts.append(f"{len(blocks)} blocks over {sum(len(b) for b in blocks)} decoder layers: {sizes}; h0 = {h0}.")
    return "\n\n".join(parts)
