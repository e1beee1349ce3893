"""Results panel: easy-VQA accuracy of FP and the held variants on one subset, and weight memory.

Every model is scored on the same fixed random subset, and results are stored per model and
subset size, so asking again after adding a variant evaluates only the new one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from qvlm import plots
from qvlm.data import load_split
from qvlm.models import ModelLoadError, VLMHandle
from qvlm.ui import quant_bridge as qb
from qvlm.ui.feedback import SKIP, end_heavy_work, log, unexpected, warn
from qvlm.ui.jobs import BackgroundJob, HeavyWorkTurn
from qvlm.ui.model_cache import canonical_name
from qvlm.ui.panel_base import PanelBase
from qvlm.ui.progress_view import StageTracker
from qvlm.ui.render import human_bytes
from qvlm.ui.texts import NO_VARIANT_NOTE

EVAL_COLUMNS = ["model", "questions", "overall %", "yes/no %", "color %", "shape %", "answers/s",
                "FP16 weights", "packed weights", "smaller by"]


class ResultsPanel(PanelBase):
    """Handlers of the Results tab."""

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
            yield warn(f"Choose between 1 and {len(load_split('test'))} test questions."), SKIP(), SKIP(), SKIP()
            return
        base = canonical_name(model_name)
        seed = 0
        if not session.begin("evaluation"):
            yield warn(f"This session is already running a {session.busy}; wait for it or press Cancel."), \
                SKIP(), SKIP(), SKIP()
            return
        tracker = StageTracker(f"Evaluating on {n} easy-VQA test questions")
        locked = False
        job: BackgroundJob | None = None
        try:
            try:
                fp = self.models.get(base)
            except ModelLoadError as err:
                yield warn(str(err)), SKIP(), SKIP(), SKIP()
                return
            models: list[tuple[str, VLMHandle, dict, tuple]] = [("FP", fp, session.fp_evals, (base, n, seed))]
            models += [(v.label, v.handle, v.evals, (n, seed)) for v in session.variants.variants(base)]
            todo = [m for m in models if m[3] not in m[2]]
            if todo:
                turn = HeavyWorkTurn(f"an evaluation ({n} questions)", tracker, session.cancel,
                                     waiting_tail="; yours starts when it finishes.")
                for status in turn:
                    yield status, SKIP(), SKIP(), SKIP()
                if not (locked := turn.acquired):
                    return
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
            yield tracker.markdown(unexpected("Evaluation", err)), SKIP(), SKIP(), SKIP()
            return
        finally:
            end_heavy_work(session, job, locked)
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
