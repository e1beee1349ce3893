"""Ask panel: the FP model and every held variant answer one question about one image, side by side.

Inference is light (tens of ms on the bundled model) so answers are not serialized with the
heavy jobs; an example image also shows easy-VQA's own answer when the question is one of
the test set's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from qvlm.data import load_split, validate_question
from qvlm.models import ModelLoadError, VLMHandle
from qvlm.ui.feedback import SKIP, image_path, log, unexpected, warn
from qvlm.ui.images import load_user_image
from qvlm.ui.model_cache import canonical_name
from qvlm.ui.panel_base import PanelBase
from qvlm.ui.render import AnswerCard, answers_html
from qvlm.ui.texts import NO_VARIANT_NOTE


class AskPanel(PanelBase):
    """Handlers of the Ask tab."""

    _reference: dict[tuple[int, str], str] | None = None  # (image id, question) -> easy-VQA answer

    def ask(self, image: Any, question: str, model_name: str, request: gr.Request | None = None) -> tuple[Any, str]:
        """(answer cards HTML, note): the FP model and every held variant of it answer the same question."""
        session = self.session(request)
        path = image_path(image)
        try:
            img, image_note = load_user_image(path)
            q = validate_question(question)
        except ValueError as err:  # ImageError is a ValueError
            return SKIP(), warn(str(err))
        base = canonical_name(model_name)
        try:
            fp = self.models.get(base)
        except ModelLoadError as err:
            return SKIP(), warn(str(err))
        except Exception as err:  # noqa: BLE001
            return SKIP(), unexpected("Loading the model", err)
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


def normalize_q(q: str) -> str:
    return " ".join(q.lower().replace("?", " ").split())
