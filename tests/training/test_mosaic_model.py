"""The second bundled model (issue 11) as shipped: plain transformers loads it offline, it meets the issue's
shape limits, it answers its own task, and the trainer's defaults are the recipe that made it."""

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from qvlm.models import MOSAIC_MODEL_DIR
from training.train_mosaic import MosaicTrainConfig


@pytest.fixture(scope="module")
def shipped():
    model = LlavaForConditionalGeneration.from_pretrained(MOSAIC_MODEL_DIR, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(MOSAIC_MODEL_DIR)


def test_the_mosaic_model_loads_offline_in_plain_transformers_within_the_issues_limits(shipped):
    model, processor = shipped
    assert model.config.vision_feature_layer == -2 and model.config.text_config.num_hidden_layers >= 16
    assert (MOSAIC_MODEL_DIR / "model.safetensors").stat().st_size <= 40e6  # FP16 on disk
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many circles are there?"}]}],
        add_generation_prompt=True)
    assert prompt == "USER: <image>\nhow many circles are there? ASSISTANT:"


def test_the_mosaic_model_answers_its_own_test_split(shipped):
    from qvlm.data.mosaic import mosaic_evaluation_subset
    from qvlm.evaluation.accuracy import evaluate

    model, processor = shipped
    result = evaluate(model, processor, mosaic_evaluation_subset(96, seed=0))
    # 84.44% on all 4,320 test questions (model card); a fixed 96 of them must not fall near chance (~45%)
    assert result.accuracy >= 0.7, result.per_type


def test_the_trainers_defaults_are_the_recipe_that_made_the_shipped_model():
    recorded = json.loads((MOSAIC_MODEL_DIR / "training_report.json").read_text())["train_config"]
    defaults = MosaicTrainConfig().to_dict()
    ignore = set(MosaicTrainConfig.RUN_CONTROL)
    differ = {k: (recorded[k], defaults[k]) for k in defaults
              if k not in ignore and json.loads(json.dumps(recorded[k])) != json.loads(json.dumps(defaults[k]))}
    assert not differ
