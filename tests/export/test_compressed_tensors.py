"""compressed-tensors export: plain transformers loads it, its weights are the project's, answers match."""

import json

import pytest
import torch

from qvlm.data import evaluation_subset
from qvlm.export import ACTIVATION_SIDECAR, COMPRESSED_TENSORS, README, save_quantized
from qvlm.export.sizes import answering_bytes, fp16_bytes, measure_export, plain_load_bytes
from qvlm.models.inference import generate_answers
from qvlm.quant import QuantConfig, quantize
from qvlm.quant.packing import PackedLinear
from tests.plain_transformers import plain_answers, plain_load

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module", params=[None, 64], ids=["per-channel", "group64"])
def exported(request, bundled, tmp_path_factory):
    cfg = QuantConfig.from_bits("W4A4", recipe="rtn", calib_size=8, weight_group_size=request.param)
    result = quantize(bundled, cfg)
    folder = save_quantized(result.handle, tmp_path_factory.mktemp("ct"), cfg.to_dict(), result.to_dict(),
                            format=COMPRESSED_TENSORS)
    return result, folder


def test_plain_from_pretrained_loads_weights_that_dequantize_to_the_projects_exactly(exported):
    result, folder = exported
    model, processor = plain_load(folder)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    # the vision tower is rotated (float in the file), so nothing compressed runs before the decompression hook:
    # the load keeps the codes, as llm-compressor's checkpoints do, and the first forward call decompresses
    assert "dequantize" not in config
    loaded = dict(model.named_modules())
    assert hasattr(loaded["model.language_model.layers.0.mlp.up_proj"], "weight_packed")
    answering_bytes(model, processor)
    ours = {n: m for n, m in result.handle.model.named_modules() if isinstance(m, PackedLinear)}
    assert any(n.startswith("model.vision_tower") for n in ours)  # the vision tower is quantized in the file too
    for name, m in ours.items():  # a rotated (vision) layer is written as its un-rotated weight Q(W R) R^T
        expected = m.dequantized_weight()
        if m.act is not None and m.act.rotation is not None:
            expected = expected @ m.act.rotation.to(expected.dtype).T
        # in the checkpoint's float16: the loader's (codes - zero) * step rounds once more than our float32
        assert loaded[name].weight.dtype == torch.float16
        torch.testing.assert_close(loaded[name].weight, expected.to(torch.float16))
        assert type(loaded[name]) is torch.nn.Linear
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {4}
    sidecar = json.loads((folder / ACTIVATION_SIDECAR).read_text())
    assert sidecar["applied_by_loader"] is False and set(sidecar["modules"]) == set(ours)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_plain_from_pretrained_then_generate_answers_under_no_grad_and_inference_mode(exported, no_grad):
    """The user's two lines: plain from_pretrained, then generate (it failed with "'Linear' object has no
    attribute 'weight'" while the checkpoint left decompression to the first forward call)."""
    _, folder = exported
    answers = plain_answers(folder, no_grad)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert "from_pretrained(" in (folder / README).read_text()


def test_answers_equal_with_activation_quantization_off_on_both_sides(exported):
    result, folder = exported
    model, processor = plain_load(folder)
    for m in result.handle.model.modules():
        if isinstance(m, PackedLinear) and m.act is not None:
            m.act.enabled = False
    try:
        samples = evaluation_subset(24, seed=7)
        images, questions = [s.load_image() for s in samples], [s.question for s in samples]
        assert generate_answers(model, processor, images, questions) == generate_answers(
            result.handle.model, result.handle.processor, images, questions)
    finally:
        for m in result.handle.model.modules():
            if isinstance(m, PackedLinear) and m.act is not None:
                m.act.enabled = True


def test_normal_float_runs_are_refused_with_a_clear_message(bundled, tmp_path):
    cfg = QuantConfig.from_bits("W4A4", recipe="qlora", calib_size=8)
    result = quantize(bundled, cfg)
    with pytest.raises(ValueError, match="NormalFloat"):
        save_quantized(result.handle, tmp_path / "nf4", cfg.to_dict(), format=COMPRESSED_TENSORS)
    with pytest.raises(ValueError, match="unknown save format"):
        save_quantized(result.handle, tmp_path / "x", cfg.to_dict(), format="gguf")


def test_cli_quantize_saves_compressed_tensors(tmp_path, bundled_dir, capsys):
    from qvlm.cli import main

    save = tmp_path / "ct"
    assert main(["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--method", "rtn", "--calib-size", "8",
                 "--out", str(tmp_path / "run"), "--save", str(save), "--format", "compressed-tensors"]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    model, _ = plain_load(save)
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_the_app_loader_reads_a_compressed_tensors_export_and_evaluates_it_under_inference_mode(exported):
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.models import load_vlm

    result, folder = exported
    handle = load_vlm(folder, device="cpu")  # decompressed while loading, whatever the config says
    plain, processor = plain_load(folder)
    answering_bytes(plain, processor)  # the plain load decompresses on its first call
    for name, module in handle.model.named_modules():
        if type(module) is torch.nn.Linear and name.startswith("model.language_model.layers.0."):
            assert torch.equal(module.weight, dict(plain.named_modules())[name].weight), name
    ev = evaluate(handle.model, handle.processor, evaluation_subset(8, seed=3), batch_size=8)
    assert ev.n == 8 and ev.accuracy >= 0.5


def test_the_plain_load_holds_the_codes_under_half_the_fp16_model_and_the_readme_says_what_was_measured(
        exported, bundled, bundled_dir):
    result, folder = exported
    fp16 = fp16_bytes(bundled.model)
    loaded, answering = plain_load_bytes(folder)
    assert loaded <= fp16 / 2 < answering  # codes after loading; every Linear decompressed by the first call
    report = measure_export(folder, True, fp_model=bundled.model, fp_folder=bundled_dir)
    assert (report.loaded, report.answering) == (loaded, answering)
    section = (folder / README).read_text().split("## Size (measured)")[1]
    assert f"{loaded:,} bytes" in section and f"{answering:,} bytes" in section and "while answering" in section
    assert "rotated input" in (folder / README).read_text()  # what a plain loader runs in the rotated tower


@pytest.fixture(scope="module")
def deployable_w8a8(bundled, tmp_path_factory):
    from qvlm.export import FORMAT_NAME

    cfg = QuantConfig.from_bits("W8A8", recipe="rtn", calib_size=8, preset="deployable")
    result = quantize(bundled, cfg)
    root = tmp_path_factory.mktemp("w8a8")
    return (save_quantized(result.handle, root / "ct", cfg.to_dict(), format=COMPRESSED_TENSORS),
            save_quantized(result.handle, root / "packed", cfg.to_dict(), format=FORMAT_NAME))


def test_deployable_w8a8_declares_dynamic_per_token_int8_inputs_that_compressed_tensors_parses(deployable_w8a8):
    from compressed_tensors.quantization import QuantizationConfig

    ct, _ = deployable_w8a8
    parsed = QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    schemes = list(parsed.config_groups.values())
    assert parsed.format == "int-quantized" and sum(len(s.targets) for s in schemes) == 80
    for scheme in schemes:
        act, w = scheme.input_activations, scheme.weights
        assert (act.num_bits, act.type, act.strategy, act.dynamic, act.symmetric) == (8, "int", "token", True, False)
        assert (w.num_bits, w.strategy) == (8, "channel")


def test_deployable_w8a8_loads_plainly_and_answers_like_its_packed_self(deployable_w8a8):
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.export import load_quantized

    ct, packed = deployable_w8a8
    samples = evaluation_subset(200, seed=5)
    model, processor = plain_load(ct)  # vision tower compressed: the config decompresses while loading
    plain = evaluate(model, processor, samples, batch_size=16)
    saved = load_quantized(packed, device="cpu")
    ours = evaluate(saved.model, saved.processor, samples, batch_size=16)
    assert plain.accuracy >= ours.accuracy - 0.005
