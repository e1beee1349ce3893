"""Quantize panel: start a run with live progress by stage, cancel it, list the held variants.

A run streams its status from a worker thread, waits (with a message) while another session
holds the CPU, and on success adds the variant to the session's LRU store, announcing any
variant the memory bound drops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from qvlm.models import ModelLoadError
from qvlm.ui import quant_bridge as qb
from qvlm.ui.feedback import SKIP, end_heavy_work, unexpected, warn
from qvlm.ui.jobs import BackgroundJob, HeavyWorkTurn
from qvlm.ui.model_cache import canonical_name
from qvlm.ui.panel_base import PanelBase
from qvlm.ui.progress_view import StageTracker
from qvlm.ui.render import human_bytes, variants_markdown
from qvlm.ui.state import SessionState, Variant, module_bytes


class QuantizePanel(PanelBase):
    """Handlers of the Quantize tab."""

    def held_markdown(self, session: SessionState) -> str:
        """The session's variants, with the bound they live under."""
        rows = [(v.label, v.seconds, v.nbytes) for v in session.variants.variants()]
        return variants_markdown(rows, self.settings.variant_budget_bytes, self.settings.max_variants)

    def quantize(
        self,
        model_name: str,
        bits: str,
        recipe: str,
        calib_size: Any,
        max_block_depth: Any,
        h0_rule: str,
        percentiles: str,
        veo_epochs: Any,
        veo_eta: Any,
        veo_lambda1: Any,
        veo_lambda2: Any,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, Any, Any, Any]]:
        """Stream (status, analysis-variant dropdown, held-variants text, layer slider) while quantizing."""
        session = self.session(request)
        try:
            cfg = qb.build_config(bits, recipe, calib_size, max_block_depth, h0_rule, percentiles,
                                  veo_epochs, veo_eta, veo_lambda1, veo_lambda2)
        except ImportError as err:
            yield unexpected("Loading the quantization core", err), SKIP(), SKIP(), SKIP()
            return
        except ValueError as err:
            yield warn(str(err)), SKIP(), SKIP(), SKIP()
            return
        if not session.begin("quantize"):
            yield warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
                SKIP(), SKIP(), SKIP()
            return
        base = canonical_name(model_name)
        key = qb.config_key(base, cfg)
        existing = session.variants.get(key, touch=False)
        label = existing.label if existing else session.variants.unique_label(qb.variant_label(bits, recipe))
        tracker = StageTracker(f"Quantizing {base} → {label}" + _config_summary(cfg))
        job: BackgroundJob | None = None
        locked = False
        try:
            turn = HeavyWorkTurn(f"a quantization ({label})", tracker, session.cancel,
                                 waiting_tail=". Jobs run one at a time on this CPU; yours starts when it "
                                              "finishes (or press Cancel).",
                                 cancelled_message="■ Cancelled while waiting; nothing was started.")
            for status in turn:
                yield status, SKIP(), SKIP(), SKIP()
            if not (locked := turn.acquired):
                return
            job = BackgroundJob(lambda cb: self._run_quantize(base, cfg, cb, session.cancel)).start()
            for events in job.poll():
                tracker.update(events)
                yield tracker.markdown(), SKIP(), SKIP(), SKIP()
            result = job.outcome()
        except qb.cancelled_types():
            yield tracker.markdown("■ Cancelled. Nothing changed: the variants you hold are all still here."), \
                SKIP(), self.held_markdown(session), SKIP()
            return
        except ModelLoadError as err:
            yield tracker.markdown(warn(str(err))), SKIP(), SKIP(), SKIP()
            return
        except ValueError as err:
            yield tracker.markdown(warn(str(err))), SKIP(), SKIP(), SKIP()
            return
        except MemoryError as err:
            yield tracker.markdown(warn(f"Out of memory while quantizing ({err}); try a smaller model or "
                                         "calibration set.")), SKIP(), SKIP(), SKIP()
            return
        except Exception as err:  # noqa: BLE001
            yield tracker.markdown(unexpected("Quantization", err)), SKIP(), SKIP(), SKIP()
            return
        finally:
            end_heavy_work(session, job, locked)

        variant = Variant(key=key, label=label, base_model=base, result=result,
                          nbytes=module_bytes(result.handle.model), seconds=job.elapsed)
        evicted = session.variants.add(variant)
        lines = [f"✓ **{label}** ready in {job.elapsed:.1f} s. See the **Analysis**, **Ask** and **Results** tabs."]
        if existing:
            lines.append(f"(It replaced the earlier `{label}` with the same settings.)")
        for old in evicted:
            msg = (f"Memory bound reached: dropped the least recently used variant '{old.label}' "
                   f"({human_bytes(old.nbytes)}) to keep this session within its limit.")
            gr.Info(msg)
            lines.append(f"ℹ {msg}")
        n_layers = len(result.handle.layer_map.language)
        top = max(0, n_layers - 2)
        entropies = list(result.entropies or [])
        # start the DED plots on the most dependent pair (highest D(k,k+1)): the interesting one
        k = max(range(len(entropies)), key=entropies.__getitem__) if entropies else n_layers // 2
        slider = gr.update(maximum=top, value=min(k, top))
        yield (tracker.markdown("\n\n".join(lines)), gr.update(choices=session.variants.labels(), value=label),
               self.held_markdown(session), slider)

    def _run_quantize(self, base: str, cfg: Any, progress: Any, cancel: threading.Event) -> Any:
        """Worker thread: load the FP model (cached), then run the core's quantize()."""
        from qvlm.quant import quantize

        progress("load", 0.0, f"loading {base}")
        fp = self.models.get(base)
        progress("load", 1.0, f"{fp.name} loaded")
        return quantize(fp, cfg, progress=progress, cancel=cancel)

    def cancel(self, request: gr.Request | None = None) -> None:
        """Ask the session's running job to stop at its next check (the job reports it)."""
        session = self.session(request)
        if session.busy:
            session.cancel.set()
            gr.Info(f"Cancelling the {session.busy}…")
        else:
            session.cancel.set()  # also stops a run still waiting for the lock
            gr.Info("Nothing is running in this session.")

    def held(self, request: gr.Request | None = None) -> str:
        return self.held_markdown(self.session(request))

    def on_page_load(self, request: gr.Request | None = None) -> str:
        """A browser opened the app: warm the default model up (once) and show this session's variants."""
        self.preload()
        return self.held(request)


def _config_summary(cfg: Any) -> str:
    """" (8 calibration pairs, VEO 10 epochs, blocks ≤ 3)": the settings a run's status should echo."""
    parts = []
    recipe = getattr(cfg, "recipe", "")
    if getattr(cfg, "calib_size", None) is not None:
        parts.append(f"{cfg.calib_size} calibration pairs")
    if getattr(cfg, "veo_epochs", None) is not None and recipe in ("qvlm", "qvlm-veo"):
        parts.append(f"VEO {cfg.veo_epochs} epochs")
    if getattr(cfg, "max_block_depth", None) is not None and recipe in ("qvlm", "qvlm-cdm"):
        parts.append(f"blocks of ≤ {cfg.max_block_depth} layers")
    return f" ({', '.join(parts)})" if parts else ""
