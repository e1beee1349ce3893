"""easy-VQA mosaics: 2x2 grids of easy-VQA images with compositional questions (the mosaic model's task).

Every mosaic is four easy-VQA images of one split (train mosaics only from train images, test
mosaics only from test images), pasted row-major: top left, top right, bottom left, bottom right.
Each cell's (shape, colour) is the dataset's own label of that image (:func:`image_labels`,
implied by the split's questions); only images whose shape *and* colour are known are used
(3,542 train, 880 test images; all 24 shape-colour pairs occur in both). Every answer is computed
from those labels by the template's rule, so no label is invented.

Image size: 128x128, the four 64 px images at full resolution. With 16 px patches each cell is the
same 4x4 patch grid the bundled model sees for a whole easy-VQA image; downscaling would shrink
the smallest shapes (~8 px wide) below a patch's detail.

Templates (:data:`TEMPLATES`): counts, positions, comparisons of two cells, existence and
existence with negation. The test split (:func:`load_mosaic_test`) is fixed and seeded: 360
questions per template, every template's answers exactly balanced, one mosaic per question,
built for the drawn answer by rejection sampling from a proposal that puts the asked attribute in
each cell with a probability p ~ U(0, 1) (so counts 0-4 are all reachable). The train generator
(:func:`sample_training_mosaic`) draws mosaics on the fly from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from qvlm.data.easy_vqa import COLORS, SHAPES, Split, fixed_subset, image_labels, load_image

Label = tuple[int, int]  # (shape index, colour index) in SHAPES / COLORS
Cells = tuple[int, int, int, int]  # easy-VQA image ids: top left, top right, bottom left, bottom right

MOSAIC_QUESTION_TYPES: tuple[str, ...] = ("count", "position", "compare", "exists", "negation")
CELL_SIZE = 64
MOSAIC_SIZE = 2 * CELL_SIZE
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIDES = {"top": (0, 1), "bottom": (2, 3), "left": (0, 2), "right": (1, 3)}
COUNTS = ("zero", "one", "two", "three", "four")
YES_NO = ("yes", "no")
PER_TEMPLATE = 360  # divisible by 2, 3, 5 and 8: every template's answers exactly balanced
TEST_SEED = 11


@dataclass(frozen=True)
class MosaicSample:
    """One mosaic question; duck-types :class:`qvlm.data.VQASample` for evaluation and calibration."""

    cells: Cells
    question: str
    answer: str
    question_type: str
    template: str
    split: Split

    @property
    def image_id(self) -> Cells:
        return self.cells

    def load_image(self) -> Image.Image:
        return compose_mosaic(self.split, self.cells)


def compose_mosaic(split: Split, cells: Cells) -> Image.Image:
    """The 128x128 RGB mosaic of four images of ``split``, row-major."""
    mosaic = Image.new("RGB", (MOSAIC_SIZE, MOSAIC_SIZE))
    for k, image_id in enumerate(cells):
        mosaic.paste(load_image(split, image_id), ((k % 2) * CELL_SIZE, (k // 2) * CELL_SIZE))
    return mosaic


# ---- templates ---------------------------------------------------------------------------------
Params = dict[str, int | str]  # "shape": index, "color": index, "pos": cell index, "side": SIDES key


@dataclass(frozen=True)
class Template:
    """A question pattern, its type, its answer set and the rule that answers it from cell labels.

    ``slots``: the parameters the text names; ``rule(params, cell_labels)`` gives the answer.
    """

    name: str
    question_type: str
    text: str
    answers: tuple[str, ...]
    slots: tuple[str, ...]
    rule: Callable[[Params, list[Label]], str]

    def draw_params(self, rng: random.Random) -> Params:
        ranges = {"shape": len(SHAPES), "color": len(COLORS), "pos": len(POSITIONS)}
        return {s: rng.choice(sorted(SIDES)) if s == "side" else rng.randrange(ranges[s]) for s in self.slots}

    def question(self, params: Params) -> str:
        words = {}
        if "shape" in params:
            words["shape"] = SHAPES[params["shape"]]
            words["shapes"] = SHAPES[params["shape"]] + "s"
        if "color" in params:
            words["color"] = COLORS[params["color"]]
        if "pos" in params:
            words["pos"] = POSITIONS[params["pos"]]
        if "side" in params:
            words["side"] = params["side"]
        return self.text.format(**words)

    def answer(self, params: Params, labels: list[Label]) -> str:
        return self.rule(params, labels)

    def focus(self, params: Params, answer: str) -> Callable[[Label], bool] | None:
        """The cell attribute whose count decides the answer, for the proposal of :func:`build_cells`.

        None for positions and comparisons: their answer depends on named cells only, so the other
        cells are drawn from the pool as they come. (A position proposal that gave *every* cell the
        answer's colour with p ~ U(0, 1) put it in 3 of 4 cells on average: "the majority colour"
        then answered ~75% of position questions without reading the named cell.)
        """
        if self.question_type in ("position", "compare"):
            return None
        return lambda lab: _has(params, lab)


def _has(params: Params, label: Label) -> bool:
    """Whether a cell has every attribute the question names (its shape and/or its colour)."""
    return ("shape" not in params or label[0] == params["shape"]) and (
        "color" not in params or label[1] == params["color"])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _number_with(params: Params, labels: list[Label]) -> str:
    return COUNTS[sum(_has(params, lab) for lab in labels)]


def _same(attr: int) -> Callable[[Params, list[Label]], str]:
    def rule(params: Params, labels: list[Label]) -> str:
        a, b = SIDES[params["side"]]
        return _yes(labels[a][attr] == labels[b][attr])
    return rule


def _exists(params: Params, labels: list[Label]) -> str:
    return _yes(any(_has(params, lab) for lab in labels))


def _absent(params: Params, labels: list[Label]) -> str:
    return _yes(not any(_has(params, lab) for lab in labels))


TEMPLATES: tuple[Template, ...] = (
    Template("count_shape", "count", "how many {shapes} are there?", COUNTS, ("shape",), _number_with),
    Template("count_color", "count", "how many {color} shapes are there?", COUNTS, ("color",), _number_with),
    Template("position_color", "position", "what color is the shape in the {pos}?", COLORS, ("pos",),
             lambda p, labels: COLORS[labels[p["pos"]][1]]),
    Template("position_shape", "position", "what shape is in the {pos}?", SHAPES, ("pos",),
             lambda p, labels: SHAPES[labels[p["pos"]][0]]),
    Template("compare_color", "compare", "are the two {side} shapes the same color?", YES_NO, ("side",), _same(1)),
    Template("compare_shape", "compare", "are the two {side} shapes the same shape?", YES_NO, ("side",), _same(0)),
    Template("exists_color", "exists", "is there a {color} shape?", YES_NO, ("color",), _exists),
    Template("exists_shape", "exists", "is there a {shape}?", YES_NO, ("shape",), _exists),
    Template("exists_color_shape", "exists", "is there a {color} {shape}?", YES_NO, ("color", "shape"), _exists),
    Template("absent_color", "negation", "is there no {color} shape?", YES_NO, ("color",), _absent),
    Template("absent_shape", "negation", "is there no {shape}?", YES_NO, ("shape",), _absent),
    Template("absent_color_shape", "negation", "is there no {color} {shape}?", YES_NO, ("color", "shape"), _absent),
)


@lru_cache(maxsize=None)
def templates_of(question_types: tuple[str, ...] | None) -> tuple[Template, ...]:
    """The templates of the given question types (all for None); unknown types are refused."""
    if question_types is None:
        return TEMPLATES
    unknown = set(question_types) - set(MOSAIC_QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question types must be some of {', '.join(MOSAIC_QUESTION_TYPES)}; "
                         f"got {sorted(question_types)}")
    return tuple(t for t in TEMPLATES if t.question_type in question_types)


def mosaic_answers() -> list[str]:
    """Every answer a mosaic question can have, sorted (18 words)."""
    return sorted({a for t in TEMPLATES for a in t.answers})


def mosaic_example_questions() -> list[str]:
    """One question of each type (count, position, compare, exists, negation), worded by its type's first template.

    Why from the templates: example questions offered to a person then ask only what the model was trained on.
    """
    params: Params = {"shape": 0, "color": 0, "pos": 0, "side": "top"}
    first: dict[str, Template] = {}
    for t in TEMPLATES:
        first.setdefault(t.question_type, t)
    return [t.question({k: params[k] for k in t.slots}) for t in first.values()]


def mosaic_words() -> list[str]:
    """Every word of every mosaic question and answer, lower-case, sorted (for the tokenizer)."""
    words = set(mosaic_answers())
    for t in TEMPLATES:
        for shape in range(len(SHAPES)):
            for color in range(len(COLORS)):
                for pos in range(len(POSITIONS)):
                    for side in SIDES:
                        params = {"shape": shape, "color": color, "pos": pos, "side": side}
                        text = t.question({k: params[k] for k in t.slots})
                        words.update(text.replace("?", " ? ").split())
    return sorted(words)


# ---- composing mosaics for an answer -----------------------------------------------------------
class LabelledPool:
    """A split's images whose shape and colour are both known, grouped by label."""

    def __init__(self, split: Split) -> None:
        labels = image_labels(split)
        self.split = split
        self.labels = {i: lab for i, lab in labels.items() if lab[0] >= 0 and lab[1] >= 0}
        by_label: dict[Label, list[int]] = {}
        for i in sorted(self.labels):
            by_label.setdefault(self.labels[i], []).append(i)
        self.by_label = by_label
        self.all_labels = sorted(by_label)

    def draw(self, rng: random.Random, want: Callable[[Label], bool] | None = None) -> int:
        """A uniformly random image id among those whose label satisfies ``want`` (any when None)."""
        choices = self.all_labels if want is None else [lab for lab in self.all_labels if want(lab)]
        label = rng.choices(choices, weights=[len(self.by_label[lab]) for lab in choices])[0]
        return rng.choice(self.by_label[label])

    def cell_labels(self, cells: Cells) -> list[Label]:
        return [self.labels[i] for i in cells]


@lru_cache(maxsize=2)
def labelled_pool(split: Split) -> LabelledPool:
    return LabelledPool(split)


def build_cells(pool: LabelledPool, template: Template, params: Params, answer: str, rng: random.Random,
                tries: int = 10_000) -> Cells:
    """Four image ids of ``pool`` on which ``template`` with ``params`` has answer ``answer``.

    Proposal: each cell has the deciding attribute with probability p ~ U(0, 1), drawn once per try
    (so a count of c among 4 cells has probability 1/5 for every c); rejected until the rule gives
    ``answer``. The answer is therefore always the rule applied to the images' own labels.
    """
    focus = template.focus(params, answer)
    for _ in range(tries):
        p = rng.random()
        cells = []
        for _ in range(4):
            if focus is None:
                cells.append(pool.draw(rng))
            else:
                hit = rng.random() < p
                cells.append(pool.draw(rng, focus if hit else (lambda lab: not focus(lab))))
        cells_t: Cells = tuple(cells)  # type: ignore[assignment]
        if template.answer(params, pool.cell_labels(cells_t)) == answer:
            return cells_t
    raise RuntimeError(f"no mosaic found for {template.name} {params} -> {answer!r} in {tries} tries")


@lru_cache(maxsize=1)
def load_mosaic_test() -> tuple[MosaicSample, ...]:
    """The fixed test split: 360 questions per template (4,320), answers balanced, shuffled (seed 11)."""
    rng = random.Random(TEST_SEED)
    pool = labelled_pool("test")
    out = []
    for t in TEMPLATES:
        for j in range(PER_TEMPLATE):
            answer = t.answers[j % len(t.answers)]
            params = t.draw_params(rng)
            cells = build_cells(pool, t, params, answer, rng)
            out.append(MosaicSample(cells, t.question(params), answer, t.question_type, t.name, "test"))
    rng.shuffle(out)
    return tuple(out)


ASK_ABOUT_DRAWS = 24
"""Parameter draws per question in :func:`ask_about`: enough to find both answers of a yes/no template."""


def ask_about(pool: LabelledPool, cells: Cells, n: int, rng: random.Random,
              templates: tuple[Template, ...] = TEMPLATES) -> list[MosaicSample]:
    """``n`` questions about a given mosaic: templates uniform, and for each the answer drawn uniformly
    among those the mosaic allows, then a question with that answer.

    Why balanced: drawing the named attributes at random answered "yes" to 70% of the existence and
    "no" to 66-69% of the comparison and negation questions, and a 16-layer language model learned
    those priors (training accuracy ~0.65-0.7) instead of reading the image tokens: on balanced test
    mosaics its yes/no answers were at chance and unchanged when the captions were shuffled.
    """
    labels = pool.cell_labels(cells)
    out = []
    for _ in range(n):
        t = rng.choice(templates)
        by_answer: dict[str, list[Params]] = {}
        for _ in range(ASK_ABOUT_DRAWS):
            params = t.draw_params(rng)
            if rng.random() < 0.5:  # name an attribute that is in the mosaic: "yes" needs it
                shape, color = rng.choice(labels)
                params = {k: shape if k == "shape" else color if k == "color" else v for k, v in params.items()}
            by_answer.setdefault(t.answer(params, labels), []).append(params)
        answer = rng.choice(sorted(by_answer))
        params = rng.choice(by_answer[answer])
        out.append(MosaicSample(cells, t.question(params), answer, t.question_type, t.name, pool.split))
    return out


def sample_training_mosaic(rng: random.Random, n_questions: int, split: Split = "train",
                           question_types: tuple[str, ...] | None = None) -> list[MosaicSample]:
    """A fresh mosaic with ``n_questions`` questions; the first has a balanced answer (template and
    answer uniform, mosaic built for it), the rest are asked about the same mosaic (:func:`ask_about`).

    ``question_types`` limits the templates to those types (a training curriculum); None: all."""
    pool = labelled_pool(split)
    templates = templates_of(question_types)
    t = rng.choice(templates)
    answer = rng.choice(t.answers)
    params = t.draw_params(rng)
    cells = build_cells(pool, t, params, answer, rng)
    first = MosaicSample(cells, t.question(params), answer, t.question_type, t.name, split)
    return [first, *ask_about(pool, cells, n_questions - 1, rng, templates)]


def mosaic_calibration_split(n: int = 64, seed: int = 0) -> list[MosaicSample]:
    """``n`` train-split mosaic questions (one per mosaic, balanced answers), deterministic per seed."""
    if n < 1:
        raise ValueError(f"calibration size must be at least 1, got {n}")
    rng = random.Random(f"mosaic-calibration-{seed}")
    return [sample_training_mosaic(rng, 1)[0] for _ in range(n)]


def mosaic_holdout_split(n: int, exclude_image_ids: set, seed: int = 0) -> list[MosaicSample]:
    """``n`` train-split mosaic questions on mosaics outside ``exclude_image_ids`` (cell tuples).

    Why: VEO's held-out error (:func:`qvlm.data.holdout_split` for easy-VQA) needs mosaics it did
    not calibrate on; train mosaics are drawn on the fly, so a different seed gives new ones and the
    exclusion removes the rare exact repeat of a calibration mosaic.
    """
    if n < 0:
        raise ValueError(f"held-out size must be at least 0, got {n}")
    rng = random.Random(f"mosaic-holdout-{seed}")
    out: list[MosaicSample] = []
    while len(out) < n:
        sample = sample_training_mosaic(rng, 1)[0]
        if sample.cells not in exclude_image_ids:
            out.append(sample)
    return out


def mosaic_evaluation_subset(limit: int | None = None, seed: int = 0) -> list[MosaicSample]:
    """The mosaic test split, or a fixed random subset of ``limit`` questions (same for every model)."""
    return fixed_subset(list(load_mosaic_test()), limit, seed)
