"""qvlm.evaluation.compare and qvlm.evaluation.modality on the bundled model: teacher-forced steps line up, KL and flips are
found where a variant really differs, the scan counts and ranks them, the sweep walks its points.

The "variant" is the FP model with its preferred first answer token pushed down in lm_head: a
difference known in advance, in milliseconds, where a real quantization rarely changes an answer.
"""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch

from qvlm.evaluation import compare
from qvlm.data import evaluation_subset
from qvlm.models.inference import answer_token_ids, continuation_probs, generate_token_ids
from qvlm.evaluation.modality import modality_activation_stats
from qvlm.utils.progress import Cancelled
from qvlm.quant.memory import WeightBytes, WeightMemory

SAMPLES = evaluation_subset(8, seed=3)


SHAPE_SAMPLE = next(s for s in evaluation_subset(200) if s.question_type == "shape")


@pytest.fixture(scope="module")
def shape_question():
    return SHAPE_SAMPLE.load_image(), SHAPE_SAMPLE.question, SHAPE_SAMPLE.answer


@pytest.fixture(scope="module")
def perturbed(bundled, shape_question):
    """The FP model with the token it answers first (a shape) made the least likely one."""
    image, question, _ = shape_question
    first = int(generate_token_ids(bundled.model, bundled.processor, [image], [question], 1)[0, 0])
    model = copy.deepcopy(bundled.model)
    with torch.no_grad():
        model.lm_head.weight[first] *= -1.0
    return SimpleNamespace(model=model, processor=bundled.processor), first


def test_teacher_forced_steps_predict_the_greedy_answer_in_a_padded_batch(bundled):
    images = [s.load_image() for s in SAMPLES[:3]]
    questions = [s.question for s in SAMPLES[:3]]
    conts = [answer_token_ids(bundled.processor, s.question, s.answer) + [bundled.processor.tokenizer.eos_token_id] * k
             for k, s in enumerate(SAMPLES[:3])]  # three lengths: right padding is exercised
    batched = continuation_probs(bundled.model, bundled.processor, images, questions, conts)
    for i in range(3):
        alone = continuation_probs(bundled.model, bundled.processor, images[i : i + 1], questions[i : i + 1], conts[i : i + 1])
        assert batched[i].shape == (len(conts[i]), len(bundled.processor.tokenizer))
        assert torch.allclose(batched[i], alone[0], atol=1e-4)


def test_the_fp_model_against_itself_has_zero_kl_and_no_flip(bundled, shape_question):
    image, question, _ = shape_question
    out = compare.token_comparison(bundled, {"same": bundled}, image, question)
    v = out.variants["same"]
    assert out.tokens[-1] == "</s>" and len(out.fp_top) == len(out.tokens)
    assert len(out.fp_top[0]) == 5 and out.fp_top[0][0][0] == out.tokens[0]
    assert v.first_diff is None and not v.flipped and max(v.kl) < 1e-6


def test_a_variant_that_answers_otherwise_is_flipped_at_step_0_with_positive_kl(bundled, shape_question, perturbed):
    image, question, _ = shape_question
    handle, first = perturbed
    out = compare.token_comparison(bundled, {"pushed": handle}, image, question)
    v = out.variants["pushed"]
    assert v.flipped and v.first_diff == 0 and v.kl[0] > 1.0
    assert v.answer != out.fp_answer
    assert all(tok != bundled.processor.tokenizer.convert_ids_to_tokens(first) for tok, _ in v.top[0][:1])


def test_the_scan_counts_flips_and_ranks_them_before_probability_drops(bundled, perturbed):
    handle, _ = perturbed
    events = []
    scan = compare.disagreement_scan(bundled, {"pushed": handle, "same": bundled}, [SHAPE_SAMPLE, *SAMPLES[:7]],
                                     batch_size=4,
                                     progress=lambda *e: events.append(e))
    assert scan["n"] == 8 and scan["counts"]["same"] == 0 and scan["counts"]["pushed"] >= 1
    assert scan["rows"][0]["flipped"] == ["pushed"]
    assert [e[1] for e in events] == [0.5, 1.0] and events[-1][0] == compare.STAGE_SCAN
    row = scan["rows"][0]
    assert set(row) >= {"image_id", "question", "answer", "fp_answer", "fp_p", "answers", "p", "flipped", "drop"}
    assert 0.0 <= row["p"]["pushed"] <= 1.0 and row["p"]["same"] == pytest.approx(row["fp_p"], abs=1e-5)
    ranked = compare.rank_disagreements(scan, limit=8)
    n_flip = scan["counts"]["pushed"]
    assert all(r["flipped"] for r in ranked[:n_flip]) and not any(r["flipped"] for r in ranked[n_flip:])
    drops = [r["drop"] for r in ranked[n_flip:]]
    assert drops == sorted(drops, reverse=True) and all(d > 1e-3 for d in drops)


def test_the_scan_stops_when_cancelled(bundled):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        compare.disagreement_scan(bundled, {}, SAMPLES, cancel=cancel)
    with pytest.raises(ValueError, match="empty"):
        compare.disagreement_scan(bundled, {}, [])


def test_bit_sweep_quantizes_and_scores_each_point_fp_first(bundled):
    made = []

    def fake_quantize(fp, cfg, cancel=None):
        made.append((cfg.recipe, cfg.bits_label, cfg.calib_size, cfg.quantize_vision))
        return SimpleNamespace(handle=fp)

    rows = compare.bit_sweep(bundled, ["rtn", "qvlm"], ["W8A8", "W4A4"], SAMPLES[:4], calib_size=4,
                             quantize=fake_quantize, measure_memory=lambda m: WeightMemory({"language": WeightBytes(5, 10, 3)}),
                             quantize_vision=False)
    assert made == [("rtn", "W8A8", 4, False), ("rtn", "W4A4", 4, False), ("qvlm", "W8A8", 4, False),
                    ("qvlm", "W4A4", 4, False)]
    assert [(r.recipe, r.bits) for r in rows] == [("fp", "FP"), ("rtn", "W8A8"), ("rtn", "W4A4"),
                                                      ("qvlm", "W8A8"), ("qvlm", "W4A4")]
    assert rows[0].quant_bytes == 10 and rows[1].quant_bytes == 3
    assert len({r.accuracy for r in rows}) == 1 and rows[0].n == 4  # the same model every time
    with pytest.raises(ValueError, match="bit setting"):
        compare.bit_sweep(bundled, ["rtn"], ["W9"], SAMPLES[:2], quantize=fake_quantize)


def test_vocabulary_hint_names_unknown_words_and_answers_outside_the_task(bundled):
    tok = bundled.processor.tokenizer
    assert compare.vocabulary_hint(tok, "what shape is in the image?", ["circle"]) is None
    hint = compare.vocabulary_hint(tok, "How many zebras are there?", ["circle", "seven"])
    assert "zebras" in hint["unknown"] and hint["outside"] == ["seven"]
    assert "triangle" in hint["known_answers"] and len(hint["known_answers"]) == 13


def test_paper_table3_holds_only_the_settings_the_paper_reports():
    table = compare.PAPER_TABLE3_LLAVA15_7B
    assert list(table) == ["SQA", "VizWiz", "VQA v2"]
    assert all(list(d) == ["FP", "W6A6", "W4A4"] for d in table.values())
    assert table["VizWiz"]["W4A4"]["Q-VLM"] == 45.82 and table["SQA"]["FP"]["FP"] == 66.79
    assert "Table 3" in compare.PAPER_TABLE3_SOURCE


def test_modality_stats_split_image_and_text_tokens_per_decoder_layer(bundled):
    rows = modality_activation_stats(bundled, n_pairs=4)
    assert [r.layer for r in rows] == list(range(len(bundled.layer_map.language)))
    n_image = rows[0].image.tokens
    assert n_image > 0 and n_image % 4 == 0 and rows[0].text.tokens > 0  # the same image tokens per pair
    for r in rows:
        assert 0 < r.image.p <= r.image.max and 0 < r.text.p <= r.text.max
    with pytest.raises(ValueError, match="calibration pairs"):
        modality_activation_stats(bundled, n_pairs=0)
