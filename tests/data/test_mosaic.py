"""The mosaic task: images and labels from the right split, a fixed balanced test split, task selection."""

from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from qvlm.data import QUESTION_TYPES, get_task, image_labels, load_image
from qvlm.data.mosaic import (
    MOSAIC_QUESTION_TYPES,
    PER_TEMPLATE,
    POSITIONS,
    TEMPLATES,
    compose_mosaic,
    load_mosaic_test,
    mosaic_calibration_split,
    sample_training_mosaic,
)

_BY_NAME = {t.name: t for t in TEMPLATES}
_labels = lru_cache(maxsize=2)(image_labels)


def _answer_from_dataset_labels(sample):
    """Re-derive the answer from easy-VQA's own labels of the sample's split, independently of the pool."""
    labels = _labels(sample.split)
    cells = [labels[i] for i in sample.cells]
    assert all(s >= 0 and c >= 0 for s, c in cells)
    t = _BY_NAME[sample.template]
    for params in _params_in(t, sample.question):
        if t.question(params) == sample.question:
            return t.answer(params, cells)
    raise AssertionError(f"question not produced by its template: {sample.question}")


def _params_in(t, question):
    from itertools import product

    from qvlm.data.mosaic import COLORS, SHAPES, SIDES

    ranges = {"shape": range(len(SHAPES)), "color": range(len(COLORS)), "pos": range(len(POSITIONS)),
              "side": sorted(SIDES)}
    for values in product(*(ranges[s] for s in t.slots)):
        yield dict(zip(t.slots, values))


def test_test_mosaics_use_only_test_images_and_answers_follow_their_labels():
    samples = load_mosaic_test()
    test_ids = set(image_labels("test"))
    assert all(s.split == "test" and set(s.cells) <= test_ids for s in samples)
    for s in samples[::7]:
        assert _answer_from_dataset_labels(s) == s.answer


def test_training_mosaics_use_only_train_images_and_answers_follow_their_labels():
    import random

    rng = random.Random(3)
    for _ in range(60):
        questions = sample_training_mosaic(rng, 6)
        assert len({q.cells for q in questions}) == 1
        for q in questions:
            assert q.split == "train"
            assert _answer_from_dataset_labels(q) == q.answer
    assert all(q.split == "train" for q in mosaic_calibration_split(16))


def test_the_mosaic_image_is_the_four_images_row_major():
    s = load_mosaic_test()[0]
    mosaic = np.asarray(compose_mosaic("test", s.cells))
    assert mosaic.shape == (128, 128, 3)
    for k, image_id in enumerate(s.cells):
        r, c = divmod(k, 2)
        assert np.array_equal(mosaic[64 * r : 64 * r + 64, 64 * c : 64 * c + 64], np.asarray(load_image("test", image_id)))


def test_the_test_split_is_fixed_and_balanced_per_template():
    samples = load_mosaic_test()
    load_mosaic_test.cache_clear()
    again = load_mosaic_test()
    assert samples == again and samples is not again
    assert len(samples) == PER_TEMPLATE * len(TEMPLATES) == 4_320
    for t in TEMPLATES:
        answers = Counter(s.answer for s in samples if s.template == t.name)
        assert set(answers) == set(t.answers)
        assert set(answers.values()) == {PER_TEMPLATE // len(t.answers)}


def test_mosaic_task_is_selectable_and_its_types_are_registered():
    task = get_task("mosaic")
    assert task.question_types == MOSAIC_QUESTION_TYPES
    assert set(MOSAIC_QUESTION_TYPES) <= set(QUESTION_TYPES)
    assert QUESTION_TYPES[:3] == ("yes/no", "color", "shape")
    subset = task.evaluation_subset(50, seed=0)
    assert subset == task.evaluation_subset(50, seed=0) and len(subset) == 50
    assert {s.question_type for s in load_mosaic_test()} == set(MOSAIC_QUESTION_TYPES)
    assert len(get_task("easy-vqa").evaluation_subset(None)) == 9_673
    with pytest.raises(ValueError, match="unknown task"):
        get_task("no-such-task")


def test_held_out_mosaics_avoid_the_calibration_mosaics_and_are_fixed_per_seed():
    from qvlm.data.mosaic import mosaic_calibration_split, mosaic_holdout_split

    calibration = mosaic_calibration_split(16, seed=0)
    seen = {s.image_id for s in calibration}
    held_out = mosaic_holdout_split(32, seen, seed=1)
    assert len(held_out) == 32 and not seen & {s.image_id for s in held_out}
    assert held_out == mosaic_holdout_split(32, seen, seed=1) != mosaic_holdout_split(32, seen, seed=2)
    assert {s.split for s in held_out} == {"train"}
    assert get_task("mosaic").holdout_split is mosaic_holdout_split


def test_a_model_folder_names_its_task_else_easy_vqa(tmp_path):
    import json

    from qvlm.data import task_of_model_folder

    assert task_of_model_folder(tmp_path) == "easy-vqa"
    (tmp_path / "training_report.json").write_text(json.dumps({"task": "mosaic"}))
    assert task_of_model_folder(tmp_path) == "mosaic"
    (tmp_path / "training_report.json").write_text(json.dumps({"task": "no-such-task"}))
    assert task_of_model_folder(tmp_path) == "easy-vqa"
    (tmp_path / "qvlm_quant.json").write_text("{not json")
    assert task_of_model_folder(tmp_path) == "easy-vqa"
    (tmp_path / "qvlm_activations.json").write_text(json.dumps({"task": "mosaic"}))
    assert task_of_model_folder(tmp_path) == "mosaic"


def test_questions_asked_about_a_training_mosaic_have_balanced_yes_no_answers():
    """Unbalanced extra questions taught the mosaic model answer priors instead of reading the image."""
    import random

    from qvlm.data.mosaic import ask_about, labelled_pool, sample_training_mosaic

    rng = random.Random(0)
    pool = labelled_pool("train")
    answers = Counter()
    for _ in range(400):
        cells = sample_training_mosaic(rng, 1)[0].cells
        for q in ask_about(pool, cells, 4, rng):
            if q.question_type in ("exists", "negation"):
                answers[q.question_type, q.answer] += 1
    for qtype in ("exists", "negation"):
        yes, no = answers[qtype, "yes"], answers[qtype, "no"]
        assert 0.4 < yes / (yes + no) < 0.6, (qtype, yes, no)


def test_a_position_questions_answer_is_not_the_mosaics_majority():
    """The named cell decides; the other cells are drawn from the pool, so 'the most frequent colour
    or shape' answers position questions only as often as independent cells allow (measured 39% for
    colours, 61% for shapes, of which there are only 3); a proposal once made it ~75%."""
    from collections import Counter

    from qvlm.data.mosaic import COLORS, SHAPES, labelled_pool

    pool = labelled_pool("test")
    for template, attr, words, bound in (("position_color", 1, COLORS, 0.5), ("position_shape", 0, SHAPES, 0.7)):
        questions = [s for s in load_mosaic_test() if s.template == template]
        majority = [words[Counter(lab[attr] for lab in pool.cell_labels(s.cells)).most_common(1)[0][0]]
                    for s in questions]
        assert sum(m == s.answer for m, s in zip(majority, questions)) / len(questions) < bound
