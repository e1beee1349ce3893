"""Results tab: accuracy of FP and the held variants on one subset of the model's task, and weight
memory; accuracy against bit-width; the paper's own numbers, apart.

Every model is scored on the same fixed random subset of its task's test split (easy-VQA, or mosaics
for the mosaic model: :func:`qvlm.data.get_task` of the FP model's task), and results are stored per
model and subset size, so asking again after adding a variant evaluates only the new one. Each row says
which towers the variant quantized (vision tower and projector switches of the Quantize tab).
The bit-width sweep (:func:`qvlm.evaluation.compare.bit_sweep`) quantizes and evaluates one point after
another as a long job; the paper's Table 3 sits in its own, labelled panel: other models, other
datasets.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from collections.abc import Callable

from qvlm.ui import plots
from qvlm.evaluation.compare import PAPER_TABLE3_LLAVA15_7B, PAPER_TABLE3_SOURCE, SweepPoint, bit_sweep
from qvlm.data import TASKS, get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.evaluation.table4 import Table4Result, read_table4
from qvlm.models import VLMHandle
from qvlm.utils.progress import ProgressCallback
from qvlm.quant import BIT_SETTINGS, MENU_ORDER, get_recipe
from qvlm.quant.integer import integer_handle
from qvlm.quant.kernels import cpu_kind
from qvlm.quant.memory import WeightMemory, resident_bytes, weight_memory
from qvlm.ui.feedback import Outputs, log, unexpected, warn
from qvlm.ui.inputs import parse_question_count
from qvlm.ui.jobs import LongJob, StageTracker, stream_job
from qvlm.ui.panel_quantize import FIRST_RUN_CALIB_PAIRS, quantized_parts, whole_number
from qvlm.ui.render import human_bytes
from qvlm.ui.settings import REPO_ROOT
from qvlm.ui.state import AppState, canonical_name
from qvlm.ui.texts import NO_VARIANT_NOTE, PAPER_TABLE_NOTE, TASK_LABELS

BitSweepFn = Callable[..., list[dict]]
EVAL_COLUMNS = ["model", "quantized", "questions", "overall %", "per question type %", "answers/s", "kernels",
                "FP16 weights", "packed weights", "smaller by", "in memory while answering"]
"""One column holds every question type's accuracy: the types are the task's (3 for easy-VQA, 5 for mosaics).
"kernels": the path that answered (a variant answers on integer kernels where its formats allow). "in memory while
answering": the parameters and buffers of the model that answered, measured (:func:`~qvlm.quant.memory.resident_bytes`:
held dequantized weights and int8 codes included), where the weight columns count the stored form."""
TABLE4_RESULTS = REPO_ROOT / "benchmarks" / "results"
"""Where ``python benchmarks/table4.py`` writes the paper's Table 4 (latency, weight memory), one file per CPU kind."""
SWEEP_COLUMNS = ["recipe", "bits", "questions", "accuracy %", "weights"]
SWEEP_RECIPES = ("qlora", "qvlm")
"""The sweep's default recipes: the paper's baseline and Q-VLM."""
SWEEP_BITS = ("W8A8", "W6A6", "W4A4", "W4A3")
SWEEP_QUESTIONS = 200
"""The sweep's default subset: 200 questions keep each point's evaluation at a few seconds here."""
SUBSET_SEED = 0
"""The subset is fixed (same questions for every model and every click), so results can be reused."""


@dataclass
class _Scored:
    """One model of the table: where its result for this subset is (or will be) stored."""

    label: str
    handle: VLMHandle
    store: dict
    key: tuple
    parts: str = "nothing (FP)"
    """Which towers are quantized, in words (:func:`~qvlm.ui.panel_quantize.quantized_parts`)."""
    variant: bool = False
    """A quantized variant: it answers through :func:`~qvlm.quant.integer.integer_handle` (integer kernels
    where its formats allow), while ``handle`` stays packed for the weight memory column."""

    def answering(self) -> VLMHandle:
        """The handle that answers the questions."""
        return integer_handle(self.handle) if self.variant else self.handle

    @property
    def done(self) -> bool:
        return self.key in self.store


def paper_table_rows(table: dict) -> list[list[Any]]:
    """The paper's table as rows: dataset, FP, then each (bit setting, method) column."""
    columns = [(b, m) for b, ms in next(iter(table.values())).items() if b != "FP" for m in ms]
    return [[name, d["FP"]["FP"], *(d[b][m] for b, m in columns)] for name, d in table.items()]


def paper_table_headers(table: dict) -> list[str]:
    return ["dataset", "FP", *(f"{b} {m}" for b, ms in next(iter(table.values())).items() if b != "FP" for m in ms)]


class ResultsPanel:
    """The Results tab: its components (made by :meth:`layout`) and its handlers.

    ``bit_sweep`` is :func:`qvlm.evaluation.compare.bit_sweep`; a test passes a stand-in with its signature.
    """

    def __init__(self, app: AppState, bit_sweep: BitSweepFn = bit_sweep) -> None:
        self.app = app
        self._bit_sweep = bit_sweep

    def layout(self) -> None:
        """The tab's components, top to bottom; the handler writes them by attribute."""
        n_test = max(task.test_size() for task in TASKS.values())  # each run checks its own task's size
        with gr.Row():
            self.n_questions = gr.Slider(10, n_test, value=100, step=10, label="Test questions (fixed random subset)",
                                         elem_id="eval-n", scale=3)
            self.start = gr.Button("Evaluate FP and variants", variant="primary", elem_id="eval-btn", scale=1)
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="eval-cancel-btn", scale=1)
        self.status = gr.Markdown("", elem_id="eval-status")
        self.table = gr.Dataframe(headers=EVAL_COLUMNS, interactive=False, elem_id="eval-table", wrap=True)
        with gr.Row():
            self.accuracy = gr.Plot(plots.accuracy_figure({}), label="Accuracy", elem_id="acc-plot")
            self.memory = gr.Plot(plots.memory_figure({}), label="Weight memory", elem_id="mem-plot")
        with gr.Group(elem_id="sweep"):
            gr.Markdown("### Accuracy vs bit-width on the model's own task (easy-VQA or mosaic)")
            with gr.Row(equal_height=True):
                self.sweep_recipes = gr.CheckboxGroup([(get_recipe(r).label, r) for r in MENU_ORDER],
                                                      value=list(SWEEP_RECIPES), label="Recipes",
                                                      elem_id="sweep-recipes", scale=3)
                self.sweep_bits = gr.CheckboxGroup(list(BIT_SETTINGS), value=list(SWEEP_BITS), label="Bit-widths",
                                                   elem_id="sweep-bits", scale=2)
            with gr.Row(equal_height=True):
                self.sweep_n = gr.Number(SWEEP_QUESTIONS, minimum=1, maximum=n_test,
                                         label="Test questions", elem_id="sweep-n", scale=1)
                self.sweep_calib = gr.Number(FIRST_RUN_CALIB_PAIRS, minimum=1, maximum=256,
                                             label="Calibration pairs per run", elem_id="sweep-calib", scale=1)
                self.sweep_start = gr.Button("Run the sweep", variant="primary", elem_id="sweep-btn", scale=1)
                self.sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel-btn", scale=1)
            self.sweep_status = gr.Markdown("*Each point is a quantization and an evaluation: about a minute each "
                                            "for Q-VLM on the bundled model.*", elem_id="sweep-status")
            self.sweep_plot = gr.Plot(plots.bit_sweep_figure([]), label="Accuracy vs bit-width", elem_id="sweep-plot")
            self.sweep_table = gr.Dataframe(headers=SWEEP_COLUMNS, interactive=False, elem_id="sweep-table")
        with gr.Group(elem_id="table4"):
            gr.Markdown("### Latency and weight memory per storage format on this machine (the paper's Table 4)")
            result = read_table4(TABLE4_RESULTS)
            if result is None:
                gr.Markdown("*Not measured yet: `python benchmarks/table4.py` (a few minutes on an idle machine) "
                            f"writes `{(TABLE4_RESULTS / f'table4-{cpu_kind()}.json').relative_to(REPO_ROOT)}`, which is drawn here.*",
                            elem_id="table4-note")
            else:
                gr.Markdown(table4_note(result), elem_id="table4-note")
                gr.Plot(plots.table4_figure(result), label="Table 4 on this machine", elem_id="table4-plot")
        with gr.Group(elem_id="paper-table"):
            gr.Markdown(f"### From the paper, not measured here: LLaVA-1.5-7B ({PAPER_TABLE3_SOURCE})")
            gr.Markdown(PAPER_TABLE_NOTE.format(source=PAPER_TABLE3_SOURCE), elem_id="paper-note")
            gr.Plot(plots.paper_table_figure(PAPER_TABLE3_LLAVA15_7B, PAPER_TABLE3_SOURCE),
                    label="Paper, Table 3 (LLaVA-1.5-7B)", elem_id="paper-plot")
            gr.Dataframe(paper_table_rows(PAPER_TABLE3_LLAVA15_7B), headers=paper_table_headers(PAPER_TABLE3_LLAVA15_7B),
                         interactive=False, elem_id="paper-values")

    def evaluate(self, n_questions: Any, model_name: str, request: gr.Request | None = None) -> Iterator[Outputs]:
        """Score FP and every held variant of it on one subset (only those not scored yet), then draw the table."""
        session = self.app.session(request)
        base = canonical_name(model_name)
        try:
            fp = self.app.models.get(base)
            task = get_task(fp.task)
            n = parse_question_count(n_questions, task.test_size())
        except ValueError as err:  # a count out of range, or ModelLoadError: a message for the user
            yield {self.status: warn(str(err))}
            return
        except Exception as err:  # noqa: BLE001
            yield {self.status: unexpected("Loading the model", err)}
            return
        models = [_Scored("FP", fp, session.fp_evals, (base, n, SUBSET_SEED))]
        models += [_Scored(v.label, v.handle, v.evals, (n, SUBSET_SEED), quantized_parts(v.result.config), True)
                   for v in session.variants.variants(base)]
        label = TASK_LABELS[task.name]
        title = f"Evaluating on {n} {label} test questions"

        def render(_: None, seconds: float) -> tuple[str, Outputs]:
            final = f"✓ {len(models)} model(s) evaluated on the same {n} test questions."
            if len(models) == 1:
                final += " " + NO_VARIANT_NOTE
            return final, self._draw(models, task.question_types, label)

        todo = [m for m in models if not m.done]
        if not todo:  # every score is stored: draw at once, no job
            final, outputs = render(None, 0.0)
            yield {self.status: StageTracker(title).markdown(final), **outputs}
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> None:
            samples = task.evaluation_subset(n, seed=SUBSET_SEED)
            for m in todo:  # each score is stored as soon as it exists: a cancel keeps the finished ones
                answering = m.answering()
                m.store[m.key] = evaluate(answering.model, answering.processor, samples, cancel=cancel,
                                          progress=lambda _stage, f, msg, label=m.label: progress(label, f, msg))

        yield from stream_job(LongJob(
            name="evaluation", title=title, holder=f"an evaluation ({n} questions)", work=work, render=render,
            cancelled="■ Cancelled. Finished evaluations are kept.",
        ), session, self.status)

    def _draw(self, models: list[_Scored], question_types: tuple[str, ...], task_label: str) -> Outputs:
        """The table and both figures, from the stored scores and each model's weight memory.

        ``question_types``: the task's, in its report order (the table's per-type column lists them so).
        """
        table, scores, memory = [], {}, {}
        for m in models:
            res = m.store[m.key]
            mem = _weight_memory(m)
            fp16, packed = (mem.fp16_bytes, mem.quant_bytes) if mem else (None, None)
            table.append([
                m.label, m.parts, res.n, round(100 * res.accuracy, 1), per_type_text(res.per_type, question_types),
                round(res.answers_per_second, 1), res.kernels,
                human_bytes(fp16) if fp16 else "", human_bytes(packed) if packed else "",
                f"{fp16 / packed:.2f}x" if fp16 and packed else "",
                human_bytes(resident_bytes(m.answering().model)),
            ])
            scores[m.label] = res
            if fp16 and packed and m.label != "FP":  # FP's FP16 size is every variant's grey bar already
                memory[m.label] = mem
        return {self.table: table, self.accuracy: plots.accuracy_figure(scores, title=f"{task_label} accuracy"),
                self.memory: plots.memory_figure(memory)}


    def sweep(self, recipes: list[str] | None, bits: list[str] | None, n_questions: Any, calib_size: Any,
              model_name: str, request: gr.Request | None = None) -> Iterator[Outputs]:
        """Quantize and evaluate every chosen (recipe, bit-width) on one subset (a long job); draw accuracy vs bits."""
        session = self.app.session(request)
        task = self.app.settings.model_task(model_name)
        try:
            n = parse_question_count(n_questions, get_task(task).test_size())
        except ValueError as err:
            yield {self.sweep_status: warn(str(err))}
            return
        if not recipes or not bits:
            yield {self.sweep_status: warn("Choose at least one recipe and one bit-width to sweep.")}
            return
        calib = whole_number(calib_size)  # the config says what is wrong with it
        base = canonical_name(model_name)
        ordered = [b for b in BIT_SETTINGS if b in bits] + [b for b in bits if b not in BIT_SETTINGS]
        label = TASK_LABELS[task]

        def work(progress: ProgressCallback, cancel: threading.Event) -> list[SweepPoint]:
            fp = self.app.models.get(base)
            samples = get_task(fp.task).evaluation_subset(n, seed=SUBSET_SEED)
            return self._bit_sweep(fp, list(recipes), ordered, samples, calib_size=calib, progress=progress,
                                   cancel=cancel)

        def render(rows: list[SweepPoint], seconds: float) -> tuple[str, Outputs]:
            table = [[r.recipe, r.bits, r.n, round(100 * r.accuracy, 1),
                      human_bytes(r.quant_bytes) if r.quant_bytes else ""] for r in rows]
            return (f"✓ {len(rows) - 1} point(s) and FP on the same {n} test questions in {seconds:.0f} s.",
                    {self.sweep_plot: plots.bit_sweep_figure(rows, title=f"{label} accuracy vs bit-width"),
                     self.sweep_table: table})

        points = len(recipes) * len(bits)
        yield from stream_job(LongJob(
            name="bit-width sweep",
            title=f"Sweeping {points} point(s) on {n} {label} test questions ({calib} calibration pairs each)",
            holder=f"a bit-width sweep ({points} points)", work=work, render=render,
            cancelled="■ Cancelled. The sweep's plot is unchanged.",
        ), session, self.sweep_status)


def per_type_text(per_type: dict[str, float], question_types: tuple[str, ...]) -> str:
    """"yes/no 99.8 · color 100.0 · shape 99.5": each type's accuracy in %, in the task's order."""
    return " · ".join(f"{t} {100 * per_type[t]:.1f}" for t in question_types if t in per_type)


def table4_note(result: Table4Result) -> str:
    """One line under the Table 4 heading: the machine and the run's settings the numbers depend on, and whether
    they hold for this server's CPU."""
    m, here = result.machine, cpu_kind()
    small = " Widths / 8: a smoke test, not a measurement." if result.small else ""
    where = ("Measured on a CPU of this server's kind" if result.kind == here else
             f"Measured on a {result.kind} CPU; this server's is {here}, where integer kernels may rank differently")
    tokens = ", ".join(map(str, result.tokens)) or "?"
    return (f"*{where}: {m.cpu} (flags: {' '.join(m.isa) or 'no flags read'}), torch {m.torch}, "
            f"{m.threads} threads, {m.date}; {tokens} tokens, median of "
            f"{result.repeats or '?'} runs. Random weights at the paper's layer widths; integer rows: per-channel "
            f"weights, dynamic per-token activations.{small}*")


def _weight_memory(m: _Scored) -> WeightMemory | None:
    """The model's FP16 and packed weight bytes; None (logged) when they cannot be measured."""
    try:
        return weight_memory(m.handle.model)
    except Exception:  # noqa: BLE001 - a missing number must not hide the accuracies
        log.warning("weight_memory failed for %s", m.label, exc_info=True)
        return None
