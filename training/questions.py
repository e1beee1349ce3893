"""Extra training questions written from easy-VQA's own templates and the per-image labels.

Why: in easy-VQA, "is there a <colour> shape?" is answered "yes" only 1 time in 8, so the
positive case of every colour comparison is rare and a model trained on the fixed questions
leans on the "no" prior (it plateaued near 89% on yes/no). Each image's shape and colour are
known (:func:`qvlm.data.image_labels`, from the *train* questions only), so any template can be
asked about any image with a correct answer; sampling the compared attribute to match the
image half of the time balances the comparisons. Templates are the train split's own strings
with the attribute word abstracted, so no new wording is introduced.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from qvlm.data import COLORS, SHAPES, load_split

_COLOR = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


@dataclass(frozen=True)
class SynthQuestion:
    question: str
    answer: str
    question_type: str


def mentions_color(question: str) -> bool:
    """Whether a question names one of easy-VQA's colours (a yes/no question that does compares one)."""
    return _COLOR.search(question.lower()) is not None


def _negated(question: str) -> bool:
    q = f" {question} "
    return " not " in q or q.startswith(" is no ")


class QuestionSynth:
    """Templates by kind: yes/no about a colour, yes/no about a shape, what-colour, what-shape."""

    def __init__(self) -> None:
        kinds: dict[str, set[str]] = {"yn_color": set(), "yn_shape": set(), "what_color": set(), "what_shape": set()}
        for s in load_split("train"):
            q = _COLOR.sub("{color}", _SHAPE.sub("{shape}", s.question))
            if s.question_type == "yes/no":
                kinds["yn_color" if "{color}" in q else "yn_shape"].add(q)
            elif s.question_type == "color":
                kinds["what_color"].add(q)
            else:
                kinds["what_shape"].add(q)
        self.templates = {k: sorted(v) for k, v in kinds.items()}

    def sample(self, shape: int, color: int, n: int, rng: random.Random) -> list[SynthQuestion]:
        """``n`` questions about an image whose labels are (shape, colour); -1 labels are skipped."""
        out: list[SynthQuestion] = []
        kinds = [k for k, need in (("yn_color", color), ("yn_shape", shape), ("what_color", color),
                                   ("what_shape", shape)) if need >= 0]
        weights = {"yn_color": 3, "yn_shape": 2, "what_color": 1, "what_shape": 1}
        for _ in range(n if kinds else 0):
            kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
            template = rng.choice(self.templates[kind])
            true_color, true_shape = COLORS[color] if color >= 0 else None, SHAPES[shape] if shape >= 0 else None
            if kind.startswith("yn"):
                truth = true_color if kind == "yn_color" else true_shape
                pool = COLORS if kind == "yn_color" else SHAPES
                asked = truth if rng.random() < 0.5 else rng.choice([v for v in pool if v != truth])
                q = template.replace("{color}" if kind == "yn_color" else "{shape}", asked)
                if "{shape}" in q or "{color}" in q:  # the other attribute mentioned too: keep it true
                    if true_shape is None or true_color is None:
                        continue
                    q = q.replace("{shape}", true_shape).replace("{color}", true_color)
                present = asked == truth
                out.append(SynthQuestion(q, "yes" if present != _negated(q) else "no", "yes/no"))
            else:
                if ("{shape}" in template and true_shape is None) or ("{color}" in template and true_color is None):
                    continue
                q = template.replace("{shape}", true_shape or "").replace("{color}", true_color or "")
                out.append(SynthQuestion(q, true_color if kind == "what_color" else true_shape,
                                         "color" if kind == "what_color" else "shape"))
        return out
