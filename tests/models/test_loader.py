"""The bundled model loads offline and answers; the layer map is complete; bad models are refused."""

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from qvlm.data import evaluation_subset, is_correct
from qvlm.models.inference import generate_answers
from qvlm.models import ModelLoadError, build_layer_map, load_vlm
from qvlm.models.loader import check_fits


def test_bundled_model_is_a_stock_llava_of_the_promised_size(bundled):
    from transformers import LlavaForConditionalGeneration

    assert type(bundled.model) is LlavaForConditionalGeneration
    assert len(bundled.layer_map.language) >= 8
    assert len(bundled.layer_map.vision) >= 4


def test_bundled_model_answers_fixed_test_questions(bundled):
    samples = evaluation_subset(200, seed=123)
    answers = generate_answers(bundled.model, bundled.processor, [s.load_image() for s in samples],
                               [s.question for s in samples])
    accuracy = sum(is_correct(a, s.answer) for a, s in zip(answers, samples)) / len(samples)
    # Measured 99.79% on the full test split (model card); the issue asks >= 95% on a fixed subset, and
    # the 67% language prior (a model that ignores the image) is far below.
    assert accuracy >= 0.97, list(zip(answers, [s.answer for s in samples]))


def test_layer_map_finds_every_linear_of_every_layer_by_role(bundled):
    lm = bundled.layer_map
    expected = {
        name
        for name, m in bundled.model.named_modules()
        if isinstance(m, nn.Linear) and (".encoder.layers." in name or ".language_model.layers." in name)
    }
    mapped = {name for name, _ in lm.linears()}
    assert mapped == expected
    assert set(lm.language[0].linears) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert set(lm.vision[0].linears) == {"q", "k", "v", "o", "fc1", "fc2"}
    modules = dict(bundled.model.named_modules())
    for name, linear in lm.linears():
        assert modules[name] is linear
    assert modules[lm.projector_name] is lm.projector
    assert lm.final_norm is bundled.model.model.language_model.norm


def test_layer_map_names_each_layers_norms_and_the_linears_that_read_them(bundled):
    lmap = build_layer_map(bundled.model)
    for entry in lmap.language:
        assert entry.norm_before("q") is entry.module.input_layernorm
        assert entry.norm_before("up") is entry.module.post_attention_layernorm and entry.norm_before("o") is None
    for entry in lmap.vision:
        assert entry.norm_before("v") is entry.module.layer_norm1 and entry.norm_before("fc1") is entry.module.layer_norm2


def test_layer_map_refuses_a_language_model_without_a_final_norm():
    core = nn.Module()
    core.vision_tower, core.language_model, core.multi_modal_projector = nn.Module(), nn.Module(), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no final norm"):
        build_layer_map(core)


def test_layer_map_refuses_a_model_without_towers():
    with pytest.raises(ValueError, match="not a LLaVA-family"):
        build_layer_map(nn.Sequential(nn.Linear(2, 2)))


def test_missing_path_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No model folder"):
        load_vlm(tmp_path / "nowhere")


def test_non_llava_config_is_refused(tmp_path):
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama' model, not a LLaVA-family"):
        load_vlm(tmp_path)


def test_remote_code_config_is_refused(tmp_path, bundled_dir):
    config = json.loads((bundled_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_vlm(tmp_path)


def test_local_folders_outside_the_allow_list_are_refused(bundled_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="outside the folders"):
        load_vlm(bundled_dir, allowed_roots=[tmp_path])


def test_memory_estimate_refuses_what_does_not_fit(bundled):
    need = check_fits(bundled.config, torch.float32, budget_bytes=1 << 40)
    n_params = sum(p.numel() for p in bundled.model.parameters())
    assert need == 4 * n_params
    with pytest.raises(ModelLoadError, match="needs about"):
        check_fits(bundled.config, torch.float32, budget_bytes=need)


def test_unknown_hub_id_without_a_reachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        load_vlm("qvlm-studio/no-such-model-anywhere")


# ------------------------------------------------------------------------------------------------
# device choice (QVLM_DEVICE) and Spaces
# ------------------------------------------------------------------------------------------------
def test_device_follows_qvlm_device_and_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    from qvlm.models import default_dtype, resolve_device

    monkeypatch.delenv("QVLM_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    monkeypatch.setenv("QVLM_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto").type == expected  # an explicit argument wins over the environment
    assert default_dtype("cpu") is torch.float32
    if torch.cuda.is_available():
        assert default_dtype("cuda") in (torch.float16, torch.bfloat16)


def test_bad_or_missing_devices_are_a_clear_error(monkeypatch):
    from qvlm.models import resolve_device

    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu please")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        monkeypatch.setenv("QVLM_DEVICE", "cuda:1")
        with pytest.raises(ValueError, match="no usable CUDA GPU"):
            resolve_device()


def test_load_vlm_places_the_model_on_the_chosen_device(bundled_dir, monkeypatch):
    monkeypatch.setenv("QVLM_DEVICE", "cpu")
    handle = load_vlm(bundled_dir)
    assert handle.device == torch.device("cpu") and handle.dtype is torch.float32


def test_copies_fit_counts_weights_against_the_budget(bundled):
    from qvlm.models import copies_fit
    from qvlm.models.loader import estimate_weight_bytes

    need = estimate_weight_bytes(bundled.config, torch.float32)
    assert copies_fit(bundled.config, 2, torch.float32, "cpu", budget_bytes=2 * need)
    assert not copies_fit(bundled.config, 2, torch.float32, "cpu", budget_bytes=2 * need - 1)


def test_gpu_task_is_the_identity_off_spaces_and_spaces_gpu_on_one(monkeypatch):
    from qvlm.models import gpu_task

    def work(x):
        return x + 1

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert gpu_task(60)(work) is work
    with pytest.raises(ValueError, match="positive"):
        gpu_task(0)
    spaces = pytest.importorskip("spaces")
    monkeypatch.setenv("SPACE_ID", "someone/q-vlm-studio")  # CPU or GPU Space hardware: spaces.GPU is a no-op
    wrapped = gpu_task(60)(work)
    assert wrapped(1) == 2
    assert spaces.GPU(duration=60)(work) is wrapped
