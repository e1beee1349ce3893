"""The training command runs end to end on a tiny architecture and its output reloads offline."""

import json

from transformers import AutoProcessor, LlavaForConditionalGeneration

from training.__main__ import main
from qvlm.data import load_split
from qvlm.models.inference import generate_answers
from qvlm.models import load_vlm


def test_train_tiny_smoke_run_saves_a_reloadable_llava(tmp_path, capsys):
    out = tmp_path / "tiny"
    code = main(["tiny", "--tiny", "--out", str(out), "--max-steps", "3", "--train-images", "24",
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


def test_caption_tokens_are_the_label_words_in_the_llms_own_embedding_space():
    import torch

    from qvlm.data import COLORS, SHAPES
    from training.tiny_llava import TinyLlavaSpec, build_model, build_tokenizer
    from training.train import _CaptionTokens

    tok = build_tokenizer()
    spec = TinyLlavaSpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
                         text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    model = build_model(spec, tok)
    tokens = _CaptionTokens(tok, 3)(model, torch.tensor([0, 2]), torch.tensor([1, 5]))
    emb = model.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids
    assert tokens.shape == (2, 3, 32)
    assert torch.equal(tokens[1, 2], emb[ids(COLORS[5])] + emb[ids(SHAPES[2])])
    assert torch.equal(tokens[0, 0], tokens[0, 1])
