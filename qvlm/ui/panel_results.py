"""Results tab: easy-VQA accuracy of FP and the held variants on one subset, and weight memory.

Every model is scored on the same fixed random subset, and results are stored per model and
subset size, so asking again after adding a variant evaluates only the new one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from qvlm import plots
from qvlm.data import evaluation_subset, load_split
from qvlm.eval import evaluate
from qvlm.models import VLMHandle
from qvlm.progress import ProgressCallback
from qvlm.quant.memory import weight_memory
from qvlm.ui.feedback import Outputs, log, unexpected, warn
from qvlm.ui.jobs import LongJob, StageTracker, stream_job
from qvlm.ui.render import human_bytes
from qvlm.ui.state import AppState, canonical_name
from qvlm.ui.texts import NO_VARIANT_NOTE

EVAL_COLUMNS = ["model", "questions", "overall %", "yes/no %", "color %", "shape %", "answers/s",
                "FP16 weights", "packed weights", "smaller by"]
SUBSET_SEED = 0
"""The subset is fixed (same questions for every model and every click), so results can be reused."""


@dataclass
class _Scored:
    """One model of the table: where its result for this subset is (or will be) stored."""

    label: str
    handle: VLMHandle
    store: dict
    key: tuple

    @property
    def done(self) -> bool:
        return self.key in self.store


class ResultsPanel:
    """The Results tab: its components (made by :meth:`layout`) and its handler."""

    def __init__(self, app: AppState) -> None:
        self.app = app

    def layout(self) -> None:
        """The tab's components, top to bottom; the handler writes them by attribute."""
        n_test = len(load_split("test"))
        with gr.Row():
            self.n_questions = gr.Slider(10, n_test, value=100, step=10, label="Test questions (fixed random subset)",
                                         elem_id="eval-n", scale=3)
            self.start = gr.Button("Evaluate FP and variants", variant="primary", elem_id="eval-btn", scale=1)
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel-btn", scale=1)
        self.status = gr.Markdown("", elem_id="eval-status")
        self.table = gr.Dataframe(headers=EVAL_COLUMNS, interactive=False, elem_id="eval-table", wrap=True)
        with gr.Row():
            self.accuracy = gr.Plot(plots.accuracy_figure([]), label="Accuracy", elem_id="acc-plot")
            self.memory = gr.Plot(plots.memory_figure([]), label="Weight memory", elem_id="mem-plot")

    def evaluate(self, n_questions: Any, model_name: str, request: gr.Request | None = None) -> Iterator[Outputs]:
        """Score FP and every held variant of it on one subset (only those not scored yet), then draw the table."""
        session = self.app.session(request)
        n_test = len(load_split("test"))
        try:
            n = float(n_questions)
        except (TypeError, ValueError):
            n = float("nan")
        if not n.is_integer() or not 1 <= n <= n_test:
            yield {self.status: warn(f"Choose between 1 and {n_test} test questions.")}
            return
        n = int(n)
        base = canonical_name(model_name)
        try:
            fp = self.app.models.get(base)
        except ValueError as err:  # ModelLoadError: a message for the user
            yield {self.status: warn(str(err))}
            return
        except Exception as err:  # noqa: BLE001
            yield {self.status: unexpected("Loading the model", err)}
            return
        models = [_Scored("FP", fp, session.fp_evals, (base, n, SUBSET_SEED))]
        models += [_Scored(v.label, v.handle, v.evals, (n, SUBSET_SEED)) for v in session.variants.variants(base)]
        title = f"Evaluating on {n} easy-VQA test questions"

        def render(_: None, seconds: float) -> tuple[str, Outputs]:
            final = f"✓ {len(models)} model(s) evaluated on the same {n} test questions."
            if len(models) == 1:
                final += " " + NO_VARIANT_NOTE
            return final, self._draw(models)

        todo = [m for m in models if not m.done]
        if not todo:  # every score is stored: draw at once, no job
            final, outputs = render(None, 0.0)
            yield {self.status: StageTracker(title).markdown(final), **outputs}
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> None:
            samples = evaluation_subset(n, seed=SUBSET_SEED)
            for m in todo:  # each score is stored as soon as it exists: a cancel keeps the finished ones
                m.store[m.key] = evaluate(m.handle.model, m.handle.processor, samples, cancel=cancel,
                                          progress=lambda _stage, f, msg, label=m.label: progress(label, f, msg))

        yield from stream_job(LongJob(
            name="evaluation", title=title, holder=f"an evaluation ({n} questions)", work=work, render=render,
            cancelled="■ Cancelled. Finished evaluations are kept.",
        ), session, self.status)

    def _draw(self, models: list[_Scored]) -> Outputs:
        """The table and both figures, from the stored scores and each model's weight memory."""
        table, acc_rows, mem_rows = [], [], []
        for m in models:
            res = m.store[m.key]
            mem = _weight_memory(m)
            fp16 = mem.get("fp16_bytes") if mem else None
            packed = mem.get("quant_bytes") if mem else None
            table.append([
                m.label, res.n, round(100 * res.accuracy, 1),
                *(round(100 * res.per_type[t], 1) if t in res.per_type else None for t in ("yes/no", "color", "shape")),
                round(res.answers_per_second, 1),
                human_bytes(fp16) if fp16 else "", human_bytes(packed) if packed else "",
                f"{fp16 / packed:.2f}x" if fp16 and packed else "",
            ])
            acc_rows.append({"model": m.label, "accuracy": res.accuracy, "per_type": res.per_type, "n": res.n,
                             "is_fp": m.label == "FP"})
            if fp16 and packed and m.label != "FP":  # FP's FP16 size is every variant's grey bar already
                mem_rows.append({"model": m.label, "fp16_bytes": fp16, "quant_bytes": packed})
        return {self.table: table, self.accuracy: plots.accuracy_figure(acc_rows),
                self.memory: plots.memory_figure(mem_rows)}


def _weight_memory(m: _Scored) -> dict[str, Any] | None:
    """The model's FP16 and packed weight bytes; None (logged) when they cannot be measured."""
    try:
        return weight_memory(m.handle.model)
    except Exception:  # noqa: BLE001 - a missing number must not hide the accuracies
        log.warning("weight_memory failed for %s", m.label, exc_info=True)
        return None
