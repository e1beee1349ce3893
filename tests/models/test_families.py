"""Every supported LLaVA family loads through load_vlm, maps its layers and generates."""

import pytest
from torch import nn

from qvlm.data import load_split
from qvlm.models.inference import generate_answers
from qvlm.models import load_vlm

from tests.families import FAMILIES, build_family


@pytest.fixture(scope="module", params=FAMILIES)
def family_handle(request, tmp_path_factory):
    folder = build_family(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_vlm(folder)


def test_layer_map_covers_every_transformer_linear(family_handle):
    family, handle = family_handle
    lm = handle.layer_map
    assert len(lm.vision) == 2 and len(lm.language) == 3
    in_layers = {n for n, m in handle.model.named_modules()
                 if isinstance(m, nn.Linear) and (".encoder.layers." in n or ".language_model.layers." in n)}
    assert {n for n, _ in lm.linears()} == in_layers


def test_generate_runs_with_the_family_prompt_format(family_handle):
    family, handle = family_handle
    samples = load_split("test")[:2]
    answers = generate_answers(handle.model, handle.processor, [s.load_image() for s in samples],
                               [s.question for s in samples], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("recipe", ["rtn", "qlora", "awq", "qvlm-cdm", "qvlm-veo", "qvlm"])
def test_every_recipe_quantizes_the_family_and_generates(family_handle, recipe):
    from qvlm.quant import QuantConfig, quantize
    from qvlm.quant.packing import PackedLinear

    family, handle = family_handle
    cfg = QuantConfig.from_bits("W4A4", recipe=recipe, calib_size=4, calib_batch=2, veo_epochs=1)
    result = quantize(handle, cfg)
    packed = [m for m in result.handle.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == sum(1 for _ in handle.layer_map.linears())
    samples = load_split("test")[:2]
    answers = generate_answers(result.handle.model, result.handle.processor, [s.load_image() for s in samples],
                               [s.question for s in samples], max_new_tokens=2)
    assert len(answers) == 2
    assert all(isinstance(m, nn.Linear) for _, m in handle.layer_map.linears())  # FP model untouched
