"""easy-VQA loader: counts, vocabulary, question types, calibration/test separation, scoring."""

from collections import Counter

import pytest

from qvlm.data import (
    COLORS,
    SHAPES,
    answer_vocabulary,
    calibration_split,
    evaluation_subset,
    image_labels,
    is_correct,
    load_split,
    normalize_answer,
    validate_question,
)


def test_split_sizes_match_the_published_dataset():
    assert len(load_split("train")) == 38_575
    assert len(load_split("test")) == 9_673
    assert len({s.image_id for s in load_split("train")}) == 4_000
    assert len({s.image_id for s in load_split("test")}) == 1_000


def test_answer_vocabulary_and_question_types():
    vocab = answer_vocabulary()
    assert len(vocab) == 13
    assert set(vocab) == {"yes", "no", *SHAPES, *COLORS}
    types = Counter(s.question_type for s in load_split("test"))
    assert types == {"yes/no": 7_136, "color": 1_280, "shape": 1_257}


def test_samples_load_64px_rgb_images():
    sample = load_split("test")[0]
    image = sample.load_image()
    assert image.size == (64, 64) and image.mode == "RGB"


def test_calibration_comes_from_train_only_and_is_deterministic():
    calib = calibration_split(64, seed=0)
    assert len(calib) == 64
    assert all(s.split == "train" for s in calib)
    assert calib == calibration_split(64, seed=0)
    assert calib != calibration_split(64, seed=1)
    test_keys = {(s.split, s.image_id) for s in load_split("test")}
    assert not {(s.split, s.image_id) for s in calib} & test_keys


def test_bad_subset_sizes_are_refused():
    with pytest.raises(ValueError, match="calibration size"):
        calibration_split(0)
    with pytest.raises(ValueError, match="positive"):
        evaluation_subset(0)
    assert len(evaluation_subset(None)) == 9_673


def test_image_labels_agree_with_shape_and_colour_answers():
    labels = image_labels("train")
    for s in load_split("train")[:2000]:
        shape, color = labels[s.image_id]
        if s.question_type == "shape":
            assert SHAPES[shape] == s.answer
        if s.question_type == "color":
            assert COLORS[color] == s.answer


def test_answer_normalization():
    assert normalize_answer(" Circle.") == "circle"
    assert is_correct("Yes, it is", "yes")
    assert not is_correct("", "no")


def test_question_validation_messages():
    assert validate_question("  what   shape? ") == "what shape?"
    with pytest.raises(ValueError, match="type a question"):
        validate_question("   ")
    with pytest.raises(ValueError, match="too long"):
        validate_question("why " * 300)
