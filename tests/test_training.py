"""The training command runs end to end on a tiny architecture and its output reloads offline."""

import json

from transformers import AutoProcessor, LlavaForConditionalGeneration

from qvlm.cli import main
from qvlm.data import load_split
from qvlm.inference import generate_answers
from qvlm.models import load_vlm


def test_train_tiny_smoke_run_saves_a_reloadable_llava(tmp_path, capsys):
    out = tmp_path / "tiny"
    code = main(["train-tiny", "--tiny", "--out", str(out), "--max-steps", "3", "--train-images", "24",
                 "--eval-questions", "8", "--threads", "2"])
    assert code == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["parameters"] > 0 and "quick_test_accuracy" in report
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    sample = load_split("test")[0]
    answers = generate_answers(model, processor, [sample.load_image()], [sample.question], max_new_tokens=2)
    assert isinstance(answers[0], str)
    handle = load_vlm(out)
    assert len(handle.layer_map.language) == 2 and len(handle.layer_map.vision) == 1
