"""The mosaic training entry point: a tiny smoke run checkpoints, stops on its time budget and resumes exactly."""

import json
import random

import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from training.__main__ import main
import pytest

from training.train_mosaic import MOSAIC_SPEC, SMOKE_SPEC, MosaicTrainConfig, build_mosaic_tokenizer, \
    cell_of_token, decoder_depth, latest_checkpoint, parse_curriculum, stack_decoder_layers
from qvlm.data.mosaic import sample_training_mosaic

_SMOKE = ["--tiny", "--max-steps", "2", "--eval-questions", "8", "--threads", "2", "--checkpoint-every", "3"]


def test_a_run_stopped_by_its_time_budget_resumes_to_the_same_weights(tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["mosaic", "--out", str(straight), *_SMOKE]) == 0
    assert main(["mosaic", "--out", str(stopped), *_SMOKE, "--max-minutes", "0"]) == 0
    report = json.loads((stopped / "training_report.json").read_text())
    assert "time budget" in report["stopped"]
    checkpoint = latest_checkpoint(stopped)
    assert checkpoint.name == "step-1"
    assert LlavaForConditionalGeneration.from_pretrained(checkpoint).config.vision_feature_layer == -2
    from qvlm.data import task_of_model_folder

    assert task_of_model_folder(checkpoint) == "mosaic"  # a probe's checkpoint is evaluated on its own task
    assert main(["mosaic", "--out", str(stopped), *_SMOKE, "--resume"]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (stopped / "train.log").read_text()
    assert "stopped: time budget" in log and "resumed from step-1" in log and "saved the FP16 model" in log
    assert "caption: stacked the 1 trained decoder layers, now 2" in log
    assert (stopped / "checkpoints" / ".gitignore").read_text() == "*\n"
    final = json.loads((stopped / "training_report.json").read_text())
    assert final["task"] == "mosaic" and "stopped" not in final and "joint_test_accuracy" in final
    processor = AutoProcessor.from_pretrained(stopped)
    assert processor.tokenizer.convert_tokens_to_ids("triangles") != processor.tokenizer.unk_token_id
    # the trained folder says its task: loading it calibrates on mosaics, not on single easy-VQA images
    from qvlm.models import load_vlm
    from qvlm.quant.calibration import calibration_batches

    handle = load_vlm(stopped, device="cpu")
    assert handle.task == "mosaic"
    batch = calibration_batches(handle, size=2, seed=0, batch_size=2)[0]
    assert tuple(batch.pixel_values.shape[-2:]) == (128, 128)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mosaic", "--out", str(out), *_SMOKE, "--max-minutes", "0"]) == 0
    assert main(["mosaic", "--out", str(out), *_SMOKE]) == 2
    assert "--resume" in capsys.readouterr().err


def test_each_image_token_knows_its_cell():
    cells = cell_of_token(MOSAIC_SPEC).view(8, 8)
    assert cells[0, 0] == 0 and cells[0, 7] == 1 and cells[7, 0] == 2 and cells[7, 7] == 3
    assert cells[3, 3] == 0 and cells[4, 4] == 3
    assert cell_of_token(SMOKE_SPEC).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_the_mosaic_model_config_meets_the_issue():
    from training.tiny_llava import build_model

    tokenizer = build_mosaic_tokenizer()
    model = build_model(MOSAIC_SPEC, tokenizer)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.text_config.num_hidden_layers >= 16 and model.config.vision_feature_layer == -2
    assert sum(p.numel() for p in model.parameters()) * 2 <= 40e6
    words = set(tokenizer.get_vocab())
    assert {"how", "many", "circles", "left", "same", "zero", "four"} <= words


def test_mosaics_composed_from_cell_pixels_equal_the_processed_mosaic_image():
    from qvlm.data.mosaic import mosaic_calibration_split
    from training.tiny_llava import build_processor
    from training.train_mosaic import CellPixels

    sample = mosaic_calibration_split(1)[0]
    processor = build_processor(MOSAIC_SPEC, build_mosaic_tokenizer())
    expected = processor.image_processor(sample.load_image(), return_tensors="pt")["pixel_values"]
    assert torch.equal(CellPixels().mosaics([sample.cells], None), expected)


def test_the_shared_prefix_loss_equals_the_plain_answer_loss_and_its_gradients():
    import random

    from qvlm.data.mosaic import sample_training_mosaic
    from training.tiny_llava import build_model, build_processor
    from training.train import QuestionTable, answer_loss
    from training.train_mosaic import shared_prefix_answer_loss

    tokenizer = build_mosaic_tokenizer()
    model = build_model(SMOKE_SPEC, tokenizer, seed=0)
    table = QuestionTable(build_processor(SMOKE_SPEC, tokenizer), SMOKE_SPEC.image_tokens)
    rng = random.Random(3)
    questions = [sample_training_mosaic(rng, 5) for _ in range(3)]
    image = torch.randn(3, SMOKE_SPEC.image_tokens, SMOKE_SPEC.text_hidden)
    results = []
    for loss_fn in (answer_loss, shared_prefix_answer_loss):
        model.zero_grad()
        embeds = image.clone().requires_grad_(True)
        loss, correct = loss_fn(model, table, embeds, questions, tokenizer.pad_token_id)
        loss.backward()
        grads = [p.grad.clone() for p in model.model.language_model.parameters() if p.grad is not None]
        results.append((loss.detach(), correct, embeds.grad, grads))
    (loss_a, ok_a, img_a, grads_a), (loss_b, ok_b, img_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.equal(ok_a, ok_b) and len(ok_a) == 15
    assert torch.allclose(img_a, img_b, atol=1e-6)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_a, grads_b))


def test_the_caption_stage_doubles_its_depth_at_the_configured_steps():
    cfg = MosaicTrainConfig()
    steps = (1, 3000, 3001, 5001, 7000, 7001, cfg.caption_steps)
    assert [cfg.caption_depth(s) for s in steps] == [2, 2, 4, 8, 8, 16, 16]
    assert MosaicTrainConfig(caption_start_layers=None).caption_depth(1) == 16
    with pytest.raises(ValueError, match="gives 32, not 16"):
        MosaicTrainConfig(caption_stack_at=(1000, 2000, 3000, 4000))
    # a saved config (JSON lists) reads back to the same schedule
    assert MosaicTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).caption_stack_at == (3000, 5000, 7000)


def test_stacking_copies_the_trained_layers_on_top_and_a_shallow_pass_skips_the_rest():
    from training.tiny_llava import build_model

    model = build_model(SMOKE_SPEC, build_mosaic_tokenizer(), seed=0)
    layers = model.model.language_model.layers
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        deep = model.model.language_model(input_ids=ids).last_hidden_state
        with decoder_depth(model, 1):
            assert len(model.model.language_model.layers) == 1
            shallow = model.model.language_model(input_ids=ids).last_hidden_state
    assert len(model.model.language_model.layers) == 2 and not torch.allclose(deep, shallow)
    stack_decoder_layers(model, 1)
    first, second = layers[0].state_dict(), layers[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    first["mlp.down_proj.weight"].add_(1.0)  # a copy, not a shared tensor
    assert not torch.equal(layers[0].mlp.down_proj.weight, layers[1].mlp.down_proj.weight)


def test_the_language_model_starts_from_the_bundled_models_words_and_layers():
    from qvlm.models import BUNDLED_MODEL_DIR
    from training.tiny_llava import build_model
    from training.train_mosaic import init_language_model

    tokenizer = build_mosaic_tokenizer()
    model = build_model(MOSAIC_SPEC, tokenizer, seed=0)
    line = init_language_model(model, tokenizer, "bundled")
    source = LlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL_DIR)
    source_vocab = AutoProcessor.from_pretrained(BUNDLED_MODEL_DIR).tokenizer.get_vocab()
    assert "8 decoder layers" in line
    a, b = model.model.language_model.layers[7].state_dict(), source.model.language_model.layers[7].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    red = tokenizer.convert_tokens_to_ids("red")
    assert torch.equal(model.get_input_embeddings().weight[red], source.get_input_embeddings().weight[source_vocab["red"]])
    assert torch.equal(model.lm_head.weight[red], source.lm_head.weight[source_vocab["red"]])
    # a mosaic-only word keeps its own row
    assert "triangles" not in source_vocab
    with pytest.raises(ValueError, match="does not fit"):
        init_language_model(build_model(SMOKE_SPEC, tokenizer, seed=0), tokenizer, "bundled")


def test_the_caption_curriculum_asks_its_phases_types_then_every_type(tmp_path, capsys):
    cfg = MosaicTrainConfig(caption_curriculum=parse_curriculum("2=position; 4=position,compare"))
    assert [cfg.caption_question_types(s) for s in (1, 2, 3, 5)] == [
        ("position",), ("position",), ("position", "compare"), None]
    assert MosaicTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).caption_curriculum == \
        cfg.caption_curriculum
    rng = random.Random(0)
    asked = {q.question_type for _ in range(20) for q in sample_training_mosaic(rng, 8, question_types=("count",))}
    assert asked == {"count"}
    with pytest.raises(ValueError, match="question types"):
        MosaicTrainConfig(caption_curriculum=((10, ("colour",)),))
    with pytest.raises(ValueError, match="LAST_STEP"):
        parse_curriculum("position")
    # the CLI takes it, and a bad phase is a one-line message, not a stack trace
    assert main(["mosaic", "--out", str(tmp_path / "bad"), *_SMOKE, "--caption-curriculum", "5=where"]) == 2
    assert "question types must be some of" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["mosaic", "--out", str(out), *_SMOKE, "--caption-curriculum", "1=position"]) == 0
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["caption_curriculum"] == [[1, ["position"]]] and saved["device"] == "cpu"
