"""The panels' event handlers, as methods of one :class:`Controller` holding the app's state.

Rules every handler follows, so that bad input never costs the user what they computed:
- a problem the user can fix is reported with ``gr.Warning`` *and* in the panel's status
  text (a toast alone is easy to miss and absent from API calls); the other outputs are
  left untouched with ``gr.skip()``;
- an unexpected exception is logged with its traceback on the server and shown as one line;
- long jobs (quantize, evaluate) stream a stage-by-stage status, can be cancelled, and are
  serialized across sessions by :data:`~qvlm.ui.jobs.HEAVY_WORK` with a "waiting" message.

Handlers can be called directly (tests pass ``request=None`` or any object with a
``session_hash``), which is how the API tests exercise each panel.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from qvlm import plots
from qvlm.data import load_split, normalize_answer, validate_question
from qvlm.models import ModelLoadError, VLMHandle
from qvlm.ui import quant_bridge as qb
from qvlm.ui.images import ImageError, load_user_image
from qvlm.ui.jobs import HEAVY_WORK, BackgroundJob
from qvlm.ui.model_cache import ModelCache, canonical_name
from qvlm.ui.progress_view import StageTracker
from qvlm.ui.render import AnswerCard, answers_html, human_bytes, variants_markdown
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import SessionRegistry, SessionState, Variant, module_bytes
from qvlm.ui.texts import NO_VARIANT_NOTE

log = logging.getLogger("qvlm.ui")

SKIP = gr.skip
EVAL_COLUMNS = ["model", "questions", "overall %", "yes/no %", "color %", "shape %", "answers/s",
                "FP16 weights", "packed weights", "smaller by"]


def _warn(message: str) -> str:
    """Toast + the same text for the status box (returned), so API callers see it too."""
    gr.Warning(message)
    return f"⚠ {message}"


def _unexpected(what: str, err: BaseException) -> str:
    log.exception("%s failed", what)
    message = f"{what} failed unexpectedly: {type(err).__name__}: {err}. Nothing you computed before was lost."
    gr.Warning(message)
    return f"✗ {message}"


def _image_path(value: Any) -> Any:
    """The file path of an image input, which arrives un-preprocessed (a FileData dict) or as a path."""
    if isinstance(value, dict):
        return value.get("path") or None
    return value


def _end_heavy_work(session, job, locked: bool) -> None:
    """Whatever ended a long callback (done, error, cancel, a closed tab): stop its worker thread,
    wait for it, and free the cross-session lock, so no run outlives its page."""
    if job is not None and not job.done:
        session.cancel.set()
        try:
            job.outcome()
        except BaseException:  # noqa: BLE001 - the callback already reported the real outcome
            pass
    if locked:
        HEAVY_WORK.release()
    session.end()


class Controller:
    """The app's server-side state (sessions, FP models) and every panel's handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionRegistry(settings.max_sessions, settings.max_variants, settings.variant_budget_bytes)
        self.models = ModelCache(settings.allowed_roots, settings.memory_budget_bytes)
        self.examples = _load_examples()
        self._reference = None
        self._preloaded = not settings.preload
        self._preload_lock = threading.Lock()

    # ------------------------------------------------------------------ sessions
    def session(self, request: Any) -> SessionState:
        sid = getattr(request, "session_hash", None) or "default"
        return self.sessions.get(sid)

    def drop_session(self, request: gr.Request | None = None) -> None:
        """Tab closed: forget the session's variants (cancelling its job, if any)."""
        sid = getattr(request, "session_hash", None)
        if sid:
            self.sessions.drop(sid)

    def preload(self) -> None:
        """Load the default FP model in the background so the first click does not wait for it.

        Called on the first page view, not at build time: while ``launch()`` starts, Gradio probes
        its own URL with a 3 s timeout and gives up on the first miss, and a model load competing
        for 2 busy cores can make it miss.
        """
        with self._preload_lock:
            if self._preloaded:
                return
            self._preloaded = True

        def run() -> None:
            try:
                fp = self.models.get(self.settings.default_model)
                images = self.examples.get("images", [])
                if images:  # one tiny generation warms up the kernels: the first real answer is not 10x slower
                    img, _ = load_user_image(str(EXAMPLES_DIR / images[0]["file"]))
                    self._answer_card("warm-up", "fp", fp, img, images[0]["questions"][0]["question"])
            except Exception:  # noqa: BLE001 - reported when the user actually uses it
                log.warning("preloading %s failed", self.settings.default_model, exc_info=True)

        threading.Thread(target=run, daemon=True, name="qvlm-preload").start()

    def held_markdown(self, session: SessionState) -> str:
        rows = [(v.label, v.seconds, v.nbytes) for v in session.variants.variants()]
        return variants_markdown(rows, self.settings.variant_budget_bytes, self.settings.max_variants)

    # ------------------------------------------------------------------ Quantize panel
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
            yield _unexpected("Loading the quantization core", err), SKIP(), SKIP(), SKIP()
            return
        except ValueError as err:
            yield _warn(str(err)), SKIP(), SKIP(), SKIP()
            return
        if not session.begin("quantize"):
            yield _warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
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
            while not (locked := HEAVY_WORK.acquire(f"a quantization ({label})", timeout=0.5)):
                if session.cancel.is_set():
                    yield tracker.markdown("■ Cancelled while waiting; nothing was started."), SKIP(), SKIP(), SKIP()
                    return
                tracker.note = (f"Waiting: another session is running {HEAVY_WORK.describe()}. Jobs run one at a "
                                "time on this CPU; yours starts when it finishes (or press Cancel).")
                yield tracker.markdown(), SKIP(), SKIP(), SKIP()
            tracker.note = ""
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
            yield tracker.markdown(_warn(str(err))), SKIP(), SKIP(), SKIP()
            return
        except ValueError as err:
            yield tracker.markdown(_warn(str(err))), SKIP(), SKIP(), SKIP()
            return
        except MemoryError as err:
            yield tracker.markdown(_warn(f"Out of memory while quantizing ({err}); try a smaller model or "
                                         "calibration set.")), SKIP(), SKIP(), SKIP()
            return
        except Exception as err:  # noqa: BLE001
            yield tracker.markdown(_unexpected("Quantization", err)), SKIP(), SKIP(), SKIP()
            return
        finally:
            _end_heavy_work(session, job, locked)

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

    # ------------------------------------------------------------------ Analysis panel
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
            return SKIP(), SKIP(), _warn("Layer and number of samples must be whole numbers.")
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
            return SKIP(), SKIP(), _warn(f"DED is defined for layers {min(sweep)}..{max(sweep)} (pairs k, k+1).")
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
            yield _warn("Quantize a model first, then pick the variant to analyse."), SKIP(), SKIP()
            return
        try:
            n = int(n_samples)
            if not 2 <= n <= 64:
                raise ValueError
        except (TypeError, ValueError):
            yield _warn("DED samples must be a whole number from 2 to 64."), SKIP(), SKIP()
            return
        if n in variant.analyses:
            ded_fig, qerr_fig, note = self.ded(label, layer, n, request)
            yield note, ded_fig, qerr_fig
            return
        if not session.begin("DED analysis"):
            yield _warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
                SKIP(), SKIP()
            return
        tracker = StageTracker(f"DED analysis of {variant.label} on {n} samples")
        job: BackgroundJob | None = None
        locked = False
        try:
            fp = self.models.get(variant.base_model)
            while not (locked := HEAVY_WORK.acquire(f"a DED analysis ({variant.label})", timeout=0.5)):
                if session.cancel.is_set():
                    yield tracker.markdown("■ Cancelled while waiting."), SKIP(), SKIP()
                    return
                tracker.note = f"Waiting: another session is running {HEAVY_WORK.describe()}."
                yield tracker.markdown(), SKIP(), SKIP()
            tracker.note = ""
            job = BackgroundJob(lambda cb: qb.ded_sweep(fp, variant.result, n, cb, session.cancel)).start()
            for events in job.poll():
                tracker.update(events)
                yield tracker.markdown(), SKIP(), SKIP()
            variant.analyses[n] = job.outcome()
        except qb.cancelled_types():
            yield tracker.markdown("■ Cancelled. The plots you had are unchanged."), SKIP(), SKIP()
            return
        except (ModelLoadError, ValueError) as err:
            yield tracker.markdown(_warn(str(err))), SKIP(), SKIP()
            return
        except Exception as err:  # noqa: BLE001
            yield tracker.markdown(_unexpected("The DED analysis", err)), SKIP(), SKIP()
            return
        finally:
            _end_heavy_work(session, job, locked)
        ded_fig, qerr_fig, note = self.ded(label, layer, n, request)
        yield tracker.markdown(f"✓ Done in {job.elapsed:.1f} s. " + note), ded_fig, qerr_fig

    def variant_choices(self, request: gr.Request | None = None) -> Any:
        labels = self.session(request).variants.labels()
        return gr.update(choices=labels, value=labels[-1] if labels else None)

    # ------------------------------------------------------------------ Ask panel
    def ask(self, image: Any, question: str, model_name: str, request: gr.Request | None = None) -> tuple[Any, str]:
        """(answer cards HTML, note): the FP model and every held variant of it answer the same question."""
        session = self.session(request)
        path = _image_path(image)
        try:
            img, image_note = load_user_image(path)
            q = validate_question(question)
        except ValueError as err:  # ImageError is a ValueError
            return SKIP(), _warn(str(err))
        base = canonical_name(model_name)
        try:
            fp = self.models.get(base)
        except ModelLoadError as err:
            return SKIP(), _warn(str(err))
        except Exception as err:  # noqa: BLE001
            return SKIP(), _unexpected("Loading the model", err)
        cards = [self._answer_card("FP · full precision", "fp", fp, img, q)]
        variants = session.variants.variants(base)
        for v in variants:
            cards.append(self._answer_card(v.label, "variant", v.handle, img, q))
        notes = [n for n in (image_note,) if n]
        if not variants:
            notes.append(NO_VARIANT_NOTE)
        others = len(session.variants.variants()) - len(variants)
        if others:
            notes.append(f"{others} variant(s) of another model are held; choose that model in the Quantize tab to ask them.")
        expected = self._expected_answer(path, q)
        return answers_html(cards, expected), "\n\n".join(notes)

    @staticmethod
    def _answer_card(name: str, kind: str, handle: VLMHandle, image: Any, question: str) -> AnswerCard:
        from qvlm.inference import answer

        try:
            a = answer(handle.model, handle.processor, image, question, max_new_tokens=16)
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
            log.exception("answering with %s failed", name)
            return AnswerCard(name, "error", f"failed: {type(err).__name__}", None, str(err)[:200])
        return AnswerCard(name, kind, a.text, a.seconds)

    def _expected_answer(self, path: Any, question: str) -> str | None:
        """easy-VQA's answer when the image is one of the bundled examples and the question is in the test set."""
        if not path:
            return None
        image_id = self.examples.get("by_file", {}).get(Path(str(path)).name)
        if image_id is None:
            return None
        if self._reference is None:
            self._reference = {(s.image_id, normalize_q(s.question)): s.answer for s in load_split("test")}
        return self._reference.get((image_id, normalize_q(question)))

    # ------------------------------------------------------------------ Results panel
    def evaluate(
        self, n_questions: Any, model_name: str, request: gr.Request | None = None
    ) -> Iterator[tuple[Any, Any, Any, Any]]:
        """Stream (status, table, accuracy figure, memory figure): FP and every held variant on one subset."""
        from qvlm.data import evaluation_subset
        from qvlm.eval import evaluate

        session = self.session(request)
        try:
            n = int(float(n_questions))
            if not 1 <= n <= len(load_split("test")):
                raise ValueError
        except (TypeError, ValueError):
            yield _warn(f"Choose between 1 and {len(load_split('test'))} test questions."), SKIP(), SKIP(), SKIP()
            return
        base = canonical_name(model_name)
        seed = 0
        if not session.begin("evaluation"):
            yield _warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
                SKIP(), SKIP(), SKIP()
            return
        tracker = StageTracker(f"Evaluating on {n} easy-VQA test questions")
        locked = False
        job: BackgroundJob | None = None
        try:
            try:
                fp = self.models.get(base)
            except ModelLoadError as err:
                yield _warn(str(err)), SKIP(), SKIP(), SKIP()
                return
            models: list[tuple[str, VLMHandle, dict, tuple]] = [("FP", fp, session.fp_evals, (base, n, seed))]
            models += [(v.label, v.handle, v.evals, (n, seed)) for v in session.variants.variants(base)]
            todo = [m for m in models if m[3] not in m[2]]
            if todo:
                while not (locked := HEAVY_WORK.acquire(f"an evaluation ({n} questions)", timeout=0.5)):
                    if session.cancel.is_set():
                        yield tracker.markdown("■ Cancelled while waiting."), SKIP(), SKIP(), SKIP()
                        return
                    tracker.note = (f"Waiting: another session is running {HEAVY_WORK.describe()}; "
                                    "yours starts when it finishes.")
                    yield tracker.markdown(), SKIP(), SKIP(), SKIP()
                tracker.note = ""
                samples = evaluation_subset(n, seed=seed)
                for label, handle, cache, key in todo:
                    def work(cb, handle=handle, label=label):
                        return evaluate(handle.model, handle.processor, samples,
                                        progress=lambda s, f, m: cb(label, f, m), cancel=session.cancel)
                    job = BackgroundJob(work).start()
                    for events in job.poll():
                        tracker.update(events)
                        yield tracker.markdown(), SKIP(), SKIP(), SKIP()
                    cache[key] = job.outcome()
        except qb.cancelled_types():
            yield tracker.markdown("■ Cancelled. Finished evaluations are kept."), SKIP(), SKIP(), SKIP()
            return
        except Exception as err:  # noqa: BLE001
            yield tracker.markdown(_unexpected("Evaluation", err)), SKIP(), SKIP(), SKIP()
            return
        finally:
            _end_heavy_work(session, job, locked)
        table, acc_rows, mem_rows = self._results_rows(models)
        final = f"✓ {len(models)} model(s) evaluated on the same {n} test questions."
        if len(models) == 1:
            final += " " + NO_VARIANT_NOTE
        yield tracker.markdown(final), table, plots.accuracy_figure(acc_rows), plots.memory_figure(mem_rows)

    def _results_rows(self, models: list) -> tuple[list[list[Any]], list[dict], list[dict]]:
        table, acc_rows, mem_rows = [], [], []
        for label, handle, cache, key in models:
            res = cache[key]
            mem = self._memory(label, handle)
            fp16 = mem.get("fp16_bytes") if mem else None
            packed = mem.get("quant_bytes") if mem else None
            table.append([
                label, res.n, round(100 * res.accuracy, 1),
                *(round(100 * res.per_type[t], 1) if t in res.per_type else None for t in ("yes/no", "color", "shape")),
                round(res.answers_per_second, 1),
                human_bytes(fp16) if fp16 else "", human_bytes(packed) if packed else "",
                f"{fp16 / packed:.2f}x" if fp16 and packed else "",
            ])
            acc_rows.append({"model": label, "accuracy": res.accuracy, "per_type": res.per_type, "n": res.n,
                             "is_fp": label == "FP"})
            if fp16 and packed and label != "FP":  # FP's FP16 size is every variant's grey bar already
                mem_rows.append({"model": label, "fp16_bytes": fp16, "quant_bytes": packed})
        return table, acc_rows, mem_rows

    def _memory(self, label: str, handle: VLMHandle) -> dict[str, Any] | None:
        try:
            return qb.weight_memory(handle.model)
        except Exception:  # noqa: BLE001 - a missing number must not hide the accuracies
            log.warning("weight_memory failed for %s", label, exc_info=True)
            return None


def normalize_q(q: str) -> str:
    return " ".join(q.lower().replace("?", " ").split())


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


def _load_examples() -> dict[str, Any]:
    """The bundled example images and questions (assets/examples/examples.json)."""
    try:
        meta = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    except (OSError, ValueError):
        log.warning("no example images found in %s", EXAMPLES_DIR)
        return {"images": [], "generic_questions": [], "by_file": {}}
    meta["by_file"] = {img["file"]: int(img["image_id"]) for img in meta.get("images", [])}
    return meta


__all__ = ["Controller", "EVAL_COLUMNS", "normalize_answer"]
