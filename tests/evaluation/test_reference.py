"""The bnb-nf4 reference: transformers' real BitsAndBytesConfig 4-bit path, and its bench row."""

import pytest
import torch

from qvlm.evaluation.bench import BenchRow, render_markdown, reference_verdicts
from qvlm.data import evaluation_subset
from qvlm.evaluation.accuracy import evaluate
from qvlm.evaluation.reference import BNB_NF4, BNB_NF4_LABEL, load_bnb_nf4

bnb = pytest.importorskip("bitsandbytes")


def test_bundled_model_loads_through_bitsandbytes_config_as_linear4bit_and_answers(bundled_dir):
    handle = load_bnb_nf4(bundled_dir)
    linears = [m for _, m in handle.layer_map.linears()]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in linears)
    ev = evaluate(handle.model, handle.processor, evaluation_subset(8, seed=3), batch_size=8)
    assert ev.n == 8 and ev.accuracy >= 0.5 and ev.answers_per_second > 0
    assert all(isinstance(p["prediction"], str) and p["prediction"] for p in ev.predictions)


def test_reference_row_enters_the_table_and_the_paired_verdicts():
    def row(bits, recipe, correct, aps):
        return {"bits": bits, "recipe": recipe, "accuracy": sum(correct) / len(correct), "per_type": {}, "n": len(correct),
                "calib_size": None, "correct": correct, "answers_per_second": aps}

    rows = [row("FP", "fp", [True] * 10, 50.0), row("W4A16", BNB_NF4, [True] * 9 + [False], 60.0),
            row("W4A4", "qlora", [True] * 5 + [False] * 5, 30.0)]
    lines = reference_verdicts([BenchRow.from_dict(r) for r in rows])
    assert len(lines) == 2 and all(BNB_NF4 in x for x in lines)
    out = {"model": "m", "eval_questions": 10, "limit": 10, "calib_size": 8, "rows": rows, "started": "now",
           "machine": {"cpus": 2, "torch": "x", "torch_threads": 2, "device": "cpu"}}
    md = render_markdown(out)
    assert BNB_NF4_LABEL in md and "Answers/s" in md and "| 60.0 |" in md
    assert "10 easy-VQA test questions" in md
    assert "10 easy-VQA mosaic test questions" in render_markdown({**out, "task": "mosaic"})
