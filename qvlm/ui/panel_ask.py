"""Ask tab: the FP model and every held variant answer one question about one image, side by side.

Inference is light (tens of ms on the bundled model) so answers are not serialized with the
long jobs; an example image also shows easy-VQA's own answer when the question is one of the
test set's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from qvlm.data import load_split, validate_question
from qvlm.inference import answer
from qvlm.models import ModelLoadError, VLMHandle
from qvlm.ui.feedback import Outputs, log, unexpected, warn
from qvlm.ui.images import load_user_image
from qvlm.ui.render import AnswerCard, answers_html
from qvlm.ui.settings import EXAMPLES_DIR
from qvlm.ui.state import AppState, canonical_name
from qvlm.ui.texts import NO_VARIANT_NOTE


def image_path(value: Any) -> str | None:
    """The file path of an image input, which arrives un-preprocessed (a FileData dict) or as a path."""
    if isinstance(value, dict):
        return value.get("path") or None
    return value


def answer_card(name: str, kind: str, handle: VLMHandle, image: Image.Image, question: str) -> AnswerCard:
    """One model's answer and latency; a failure becomes an error card, so it cannot hide the other answers."""
    try:
        a = answer(handle.model, handle.processor, image, question, max_new_tokens=16)
    except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
        log.exception("answering with %s failed", name)
        return AnswerCard(name, "error", f"failed: {type(err).__name__}", None, str(err)[:200])
    return AnswerCard(name, kind, a.text, a.seconds)


def _normalize_question(q: str) -> str:
    return " ".join(q.lower().replace("?", " ").split())


class AskPanel:
    """The Ask tab: its components (made by :meth:`layout`) and its handlers."""

    def __init__(self, app: AppState) -> None:
        self.app = app
        self._reference: dict[tuple[int, str], str] | None = None  # (image id, question) -> easy-VQA answer
        self._warmed = not app.settings.preload
        self._warm_lock = threading.Lock()

    def layout(self) -> None:
        """The tab's components, top to bottom; handlers read and write them by attribute."""
        examples = self.app.examples
        with gr.Row():
            self.image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=260,
                                  elem_id="ask-image", scale=1)
            with gr.Column(scale=2):
                self.question = gr.Textbox(label="Question", placeholder="what shape is in the image?",
                                           max_lines=2, elem_id="question")
                self.ask_button = gr.Button("Ask", variant="primary", elem_id="ask-btn")
                if examples.get("generic_questions"):
                    gr.Examples([[q] for q in examples["generic_questions"]], inputs=[self.question],
                                label="Example questions", elem_id="question-examples", cache_examples=False)
        self.answers = gr.HTML(answers_html([]), elem_id="answers")
        self.note = gr.Markdown("", elem_id="ask-note")
        if examples.get("images"):
            gr.Examples(
                [[str(EXAMPLES_DIR / img["file"]), img["questions"][0]["question"]] for img in examples["images"]],
                inputs=[self.image, self.question], label="Example images (easy-VQA test split): click one",
                elem_id="image-examples", cache_examples=False, examples_per_page=12,
            )

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
        notes = [image_note] if image_note else []
        if not variants:
            notes.append(NO_VARIANT_NOTE)
        others = len(session.variants.variants()) - len(variants)
        if others:
            notes.append(f"{others} variant(s) of another model are held; choose that model in the Quantize tab "
                         "to ask them.")
        return {self.answers: answers_html(cards, self._expected_answer(path, q)), self.note: "\n\n".join(notes)}

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
            images = self.app.examples.get("images", [])
            if images:
                img, _ = load_user_image(str(EXAMPLES_DIR / images[0]["file"]))
                answer_card("warm-up", "fp", fp, img, images[0]["questions"][0]["question"])
        except Exception:  # noqa: BLE001 - reported when the user actually uses it
            log.warning("warming up %s failed", model, exc_info=True)

    def _expected_answer(self, path: str | None, question: str) -> str | None:
        """easy-VQA's answer when the image is one of the bundled examples and the question is in the test set."""
        if not path:
            return None
        image_id = self.app.examples.get("by_file", {}).get(Path(str(path)).name)
        if image_id is None:
            return None
        if self._reference is None:
            self._reference = {(s.image_id, _normalize_question(s.question)): s.answer for s in load_split("test")}
        return self._reference.get((image_id, _normalize_question(question)))
