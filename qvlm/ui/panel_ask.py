"""Ask tab: the FP model and every held variant answer one question about one image, side by side.

Inference is light (tens of ms on the bundled model) so answers are not serialized with the
long jobs; an example image also shows its task's own answer when the question is one of the
test set's. The example images and questions follow the picked model's task (easy-VQA or mosaic).
Below the answers, the models are compared token by token
(:func:`qvlm.evaluation.compare.token_comparison`), and the disagreement finder scans test questions for
answers that differ (:func:`qvlm.evaluation.compare.disagreement_scan`, a long job); clicking a found
question loads it here. Variants answer on integer kernels where their formats allow
(:func:`qvlm.quant.integer.integer_handle`), and each card names the path under its latency.
"""

from __future__ import annotations

import dataclasses
import html
import threading
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from PIL import Image

from qvlm.ui import plots
from qvlm.evaluation.compare import disagreement_scan, rank_disagreements, token_comparison, vocabulary_hint
from qvlm.data import DEFAULT_TASK, get_task, normalize_answer, validate_question
from qvlm.models.inference import answer
from qvlm.models import ModelLoadError, VLMHandle
from qvlm.quant.integer import execution_path, integer_handle
from qvlm.utils.progress import ProgressCallback
from qvlm.ui.examples import TaskExamples, examples_by_task, reference_answer, served_image_path
from qvlm.ui.feedback import Outputs, log, unexpected, warn
from qvlm.ui.images import load_user_image
from qvlm.ui.inputs import parse_question_count
from qvlm.ui.jobs import LongJob, stream_job
from qvlm.ui.render import AnswerCard, answers_html, token_table_html, vocabulary_hint_markdown
from qvlm.ui.state import AppState, SessionState, Variant, canonical_name
from qvlm.ui.texts import NO_VARIANT_NOTE, TASK_HINTS, TASK_LABELS

TokenComparisonFn = Callable[..., dict]
ScanFn = Callable[..., dict]
FINDER_QUESTIONS = 500
"""The finder's default scan: 500 test questions take about half a minute per model on the bundled model."""
FINDER_SHOWN = 24
"""Thumbnails shown: every flipped answer first, then the largest drops of the right answer's probability."""
FINDER_SEED = 0
"""The finder scans a fixed random subset of the model's test split (the same questions on every click)."""


def image_path(value: Any) -> str | None:
    """The file path of an image input, which arrives un-preprocessed (a FileData dict) or as a path."""
    if isinstance(value, dict):
        return value.get("path") or None
    return value


def answer_card(name: str, kind: str, handle: VLMHandle, image: Image.Image, question: str) -> AnswerCard:
    """One model's answer, its latency and the path that computed it; a failure becomes an error card, so it
    cannot hide the other answers. A variant answers on integer kernels where its formats allow
    (:func:`~qvlm.quant.integer.integer_handle`)."""
    try:
        if kind == "variant":
            handle = integer_handle(handle)
        a = answer(handle.model, handle.processor, image, question, max_new_tokens=16)
    except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
        log.exception("answering with %s failed", name)
        return AnswerCard(name, "error", f"failed: {type(err).__name__}", None, str(err)[:200])
    return AnswerCard(name, kind, a.text, a.seconds, f"on {execution_path(handle.model)}")


def flag_flips(cards: list[AnswerCard]) -> list[AnswerCard]:
    """The cards with each variant whose answer differs from the FP card's marked ``flipped``."""
    fp = normalize_answer(cards[0].text)
    return [dataclasses.replace(c, flipped=c.kind == "variant" and normalize_answer(c.text) != fp) for c in cards]


class AskPanel:
    """The Ask tab: its components (made by :meth:`layout`) and its handlers.

    ``token_comparison`` is :func:`qvlm.evaluation.compare.token_comparison` and ``disagreement_scan`` is
    :func:`qvlm.evaluation.compare.disagreement_scan`; a test passes stand-ins with their signatures.
    """

    def __init__(self, app: AppState, token_comparison: TokenComparisonFn = token_comparison,
                 disagreement_scan: ScanFn = disagreement_scan) -> None:
        self.app = app
        self._token_comparison = token_comparison
        self._scan = disagreement_scan
        self.examples: dict[str, TaskExamples] = examples_by_task(app.examples)
        self._example_boxes: list[tuple[str, gr.Column]] = []  # (task, the box showing its examples)
        self._warmed = not app.settings.preload
        self._warm_lock = threading.Lock()

    def layout(self) -> None:
        """The tab's components, top to bottom; handlers read and write them by attribute.

        Every task's examples are laid out, each in a box shown only while a model of that task is
        picked (:meth:`offer_examples`).
        """
        shown = self.app.settings.model_task(self.app.settings.default_model)
        with gr.Row():
            self.image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=260,
                                  elem_id="ask-image", scale=1)
            with gr.Column(scale=2):
                self.question = gr.Textbox(label="Question", placeholder="what shape is in the image?",
                                           max_lines=2, elem_id="question")
                self.ask_button = gr.Button("Ask", variant="primary", elem_id="ask-btn")
                for task, ex in self.examples.items():
                    if ex.questions:
                        with self._example_box(task, shown):
                            gr.Examples([[q] for q in ex.questions], inputs=[self.question], label="Example questions",
                                        elem_id=_examples_id(task, "question-examples"), cache_examples=False)
        self.answers = gr.HTML(answers_html([]), elem_id="answers")
        self.note = gr.Markdown("", elem_id="ask-note")
        for task, ex in self.examples.items():
            if ex.images:
                with self._example_box(task, shown):
                    gr.Examples([list(pair) for pair in ex.images], inputs=[self.image, self.question], label=ex.label,
                                elem_id=_examples_id(task, "image-examples"), cache_examples=False,
                                examples_per_page=12)
        with gr.Accordion("Token by token: where quantization bites", open=True, elem_id="tokens"):
            self.token_note = gr.Markdown("*Ask a question: every model is then fed the FP model's answer token by "
                                          "token, and its next-token probabilities are compared with FP's.*",
                                          elem_id="token-note")
            self.token_table = gr.HTML(token_table_html(None), elem_id="token-table-box")
            self.token_plot = gr.Plot(plots.token_kl_figure(None), label="KL(FP‖variant) per step", elem_id="token-plot")
        with gr.Accordion("Disagreement finder", open=False, elem_id="finder"):
            with gr.Row(equal_height=True):
                self.finder_variants = gr.Dropdown([], value=[], multiselect=True, label="Variants (none chosen: all "
                                                   "held variants of the model)", elem_id="finder-variants", scale=3)
                self.finder_n = gr.Number(FINDER_QUESTIONS, minimum=1, label="Test questions",
                                          elem_id="finder-n", scale=1)
                self.finder_start = gr.Button("Find disagreements", variant="primary", elem_id="finder-btn", scale=1)
                self.finder_cancel = gr.Button("Cancel", variant="stop", elem_id="finder-cancel-btn", scale=1)
            self.finder_status = gr.Markdown("", elem_id="finder-status")
            self.found = gr.Gallery([], label="Flipped answers first, then the largest drops of the right answer's "
                                    "probability: click one to ask it", columns=4, height="auto", allow_preview=False,
                                    elem_id="finder-gallery")
            self.found_rows = gr.State([])  # the gallery's questions, in its order: what a click loads

    def _example_box(self, task: str, shown: str) -> gr.Column:
        """A box for some of ``task``'s examples, visible while ``task`` is the one ``shown``; kept for the switch."""
        box = gr.Column(visible=task == shown, elem_classes=["qvlm-examples", f"qvlm-examples-{task}"])
        self._example_boxes.append((task, box))
        return box

    @property
    def example_boxes(self) -> list[gr.Column]:
        """Every example box, in layout order: the outputs of :meth:`offer_examples`."""
        return [box for _, box in self._example_boxes]

    def offer_examples(self, model_name: str) -> Outputs:
        """Show the example images and questions of the picked model's task, hide the other tasks' (a mosaic model cannot answer about single shapes)."""
        task = self.app.settings.model_task(model_name)
        return {box: gr.update(visible=t == task) for t, box in self._example_boxes}

    def answer_all(self, image: Any, question: str, model_name: str, request: gr.Request | None = None) -> Outputs:
        """Ask the FP model and every held variant of it the same question; cards side by side, FP first."""
        session = self.app.session(request)
        path = image_path(image)
        try:
            img, image_note = load_user_image(path)
            q = validate_question(question)
        except ValueError as err:  # ImageError is a ValueError
            return {self.note: warn(str(err))}
        base = canonical_name(model_name)
        try:
            fp = self.app.models.get(base)
        except ModelLoadError as err:
            return {self.note: warn(str(err))}
        except Exception as err:  # noqa: BLE001
            return {self.note: unexpected("Loading the model", err)}
        variants = session.variants.variants(base)
        cards = [answer_card("FP · full precision", "fp", fp, img, q)]
        cards += [answer_card(v.label, "variant", v.handle, img, q) for v in variants]
        cards = flag_flips(cards)
        notes = [image_note] if image_note else []
        hint = vocabulary_hint(fp.processor.tokenizer, q, [c.text for c in cards if c.kind != "error"], fp.task)
        if hint:
            notes.append(vocabulary_hint_markdown(hint, TASK_HINTS[fp.task]))
        if not variants:
            notes.append(NO_VARIANT_NOTE)
        others = len(session.variants.variants()) - len(variants)
        if others:
            notes.append(f"{others} variant(s) of another model are held; choose that model in the Quantize tab "
                         "to ask them.")
        reference = reference_answer(path, q)
        html = answers_html(cards, reference[1], TASK_LABELS[reference[0]]) if reference else answers_html(cards)
        return {self.answers: html, self.note: "\n\n".join(notes)}

    def compare_tokens(self, image: Any, question: str, model_name: str, request: gr.Request | None = None) -> Outputs:
        """Feed FP's greedy answer to every model; per step the top-5 next tokens, KL(FP‖variant), the first difference."""
        session = self.app.session(request)
        try:
            img, _ = load_user_image(image_path(image))
            q = validate_question(question)
            fp = self.app.models.get(canonical_name(model_name))
        except ValueError as err:  # the answers' own note already says what is wrong
            return {self.token_note: f"*Token comparison not run: {err}*"}
        try:
            variants = {v.label: integer_handle(v.handle) for v in session.variants.variants(canonical_name(model_name))}
            comparison = self._token_comparison(fp, variants, img, q)
        except Exception as err:  # noqa: BLE001 - the answers above stay
            return {self.token_note: unexpected("The token comparison", err)}
        fp_answer = html.escape(comparison.fp_answer)  # model text, shown as text, never as markup
        if not variants:
            note = f"FP's answer **{fp_answer}**, token by token. " + NO_VARIANT_NOTE
        else:
            parts = []
            for label, v in comparison.variants.items():
                where = "the same top token at every step" if v.first_diff is None else \
                    f"first differs at step {v.first_diff}"
                flip = " · **flipped**" if v.flipped else ""
                parts.append(f"`{label}`: answers **{html.escape(v.answer)}**, {where}, KL up to "
                             f"{max(v.kl, default=0):.3g} nats{flip}")
            note = (f"Every model is fed FP's answer **{fp_answer}** token by token (teacher forcing), "
                    "so the steps line up.\n\n" + "\n".join(f"- {p}" for p in parts))
        return {self.token_note: note, self.token_table: token_table_html(comparison),
                self.token_plot: plots.token_kl_figure(comparison)}

    def offer_variants(self, model_name: str, request: gr.Request | None = None) -> Outputs:
        """The finder's variant menu: the held variants of the chosen model (the choice kept where still held)."""
        labels = [v.label for v in self.app.session(request).variants.variants(canonical_name(model_name))]
        return {self.finder_variants: gr.update(choices=labels)}

    def find_disagreements(self, model_name: str, chosen: list[str] | None, n_questions: Any,
                           request: gr.Request | None = None) -> Iterator[Outputs]:
        """Scan test questions with FP and the chosen variants (a long job); thumbnails of what changed."""
        session = self.app.session(request)
        task = self.app.settings.model_task(model_name)
        try:
            n = parse_question_count(n_questions, get_task(task).test_size(), " to scan")
        except ValueError as err:
            yield {self.finder_status: warn(str(err))}
            return
        base = canonical_name(model_name)
        variants = self._chosen_variants(session, base, chosen or [])
        if not variants:
            yield {self.finder_status: warn("Quantize the model first (Quantize tab): the finder compares its "
                                            "variants with it.")}
            return

        def work(progress: ProgressCallback, cancel: threading.Event) -> tuple[dict, str, list]:
            fp = self.app.models.get(base)
            samples = get_task(fp.task).evaluation_subset(n, seed=FINDER_SEED)
            scan = self._scan(fp, {v.label: integer_handle(v.handle) for v in variants}, samples, progress=progress,
                              cancel=cancel)
            return scan, fp.task, samples

        def render(result: tuple[dict, str, list], seconds: float) -> tuple[str, Outputs]:
            scan, scanned_task, samples = result
            found = rank_disagreements(scan, FINDER_SHOWN)
            counts = "; ".join(f"`{label}`: **{c}** of {scan['n']} answers differ from FP ({100 * c / scan['n']:.1f}%)"
                               for label, c in scan["counts"].items())
            line = f"✓ Scanned {scan['n']} test questions in {seconds:.1f} s. {counts}."
            if not found:
                line += " No answer changed and no right answer lost probability."
            else:
                line += "\n\n" + found_table(found)
            paths = [served_image_path(scanned_task, samples[r["index"]]) for r in found]
            gallery = [(path, _caption(r)) for path, r in zip(paths, found, strict=True)]
            rows = [{"image_id": r["image_id"], "question": r["question"], "path": path}
                    for path, r in zip(paths, found, strict=True)]
            return line, {self.found: gallery, self.found_rows: rows}

        yield from stream_job(LongJob(
            name="disagreement scan",
            title=f"Scanning {n} {TASK_LABELS[task]} test questions with FP and {len(variants)} variant(s)",
            holder=f"a disagreement scan ({n} questions)", work=work, render=render,
            cancelled="■ Cancelled. The questions found before are still shown.",
        ), session, self.finder_status)

    def load_found(self, rows: list[dict], evt: gr.SelectData) -> Outputs:
        """A clicked thumbnail's image and question, into the Ask inputs."""
        if not rows or evt.index is None or not 0 <= int(evt.index) < len(rows):
            return {}
        row = rows[int(evt.index)]
        return {self.image: row["path"], self.question: row["question"]}

    @staticmethod
    def _chosen_variants(session: SessionState, base: str, chosen: list[str]) -> list[Variant]:
        """The chosen variants still held; all held variants of the model when none is chosen (or held)."""
        held = session.variants.variants(base)
        return [v for v in held if v.label in chosen] or held

    def warm_up(self) -> None:
        """Load the default FP model in the background and answer one question, once per app.

        Why: the first click then neither waits for the load nor pays the first generation's
        ~10x slower kernels. Called on the first page view, not at build time: while ``launch()``
        starts, Gradio probes its own URL with a 3 s timeout and gives up on the first miss, and a
        model load competing for 2 busy cores can make it miss.
        """
        with self._warm_lock:
            if self._warmed:
                return
            self._warmed = True
        threading.Thread(target=self._warm_up, daemon=True, name="qvlm-warm-up").start()

    def _warm_up(self) -> None:
        model = self.app.settings.default_model
        try:
            fp = self.app.models.get(model)
            images = self.examples[fp.task].images
            if images:
                img, _ = load_user_image(images[0][0])
                answer_card("warm-up", "fp", fp, img, images[0][1])
        except Exception:  # noqa: BLE001 - reported when the user actually uses it
            log.warning("warming up %s failed", model, exc_info=True)


def _examples_id(task: str, part: str) -> str:
    """An examples block's elem_id: easy-VQA's keep their first names (``image-examples``), others are prefixed."""
    return part if task == DEFAULT_TASK else f"{task}-{part}"


def _caption(row: dict) -> str:
    """A thumbnail's caption, short enough for one line under it: the change, then FP's answer -> the variants'.

    The question and every answer are in :func:`found_table` under the status, numbered as the gallery.
    """
    mark = "⚑" if row["flipped"] else f"p −{row['drop']:.2f}"
    others = "/".join(dict.fromkeys(str(a) for a in row["answers"].values()))
    return f"{mark} {row['fp_answer']} → {others}"


def found_table(found: list[dict]) -> str:
    """The finder's questions in full, one Markdown row each in the gallery's order (captions stay short)."""
    labels = list(dict.fromkeys(label for r in found for label in r["answers"]))

    def cell(text: Any) -> str:
        return html.escape(str(text)).replace("|", "\\|")

    head = ["#", "question", "right", "FP", *(cell(label) for label in labels), "p(right) drop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(found, 1):
        answers = [cell(r["answers"].get(label, "")) for label in labels]
        mark = " ⚑" if r["flipped"] else ""
        lines.append(f"| {i}{mark} | {cell(r['question'])} | {cell(r['answer'])} | {cell(r['fp_answer'])} | "
                     + " | ".join(answers) + f" | {r['drop']:.2f} |")
    return "\n".join(lines)
