"""bitsandbytes export: plain transformers loads the run's NF4 layers as Linear4bit, and generate answers."""

import json

import pytest
import torch

from qvlm.data import evaluation_subset
from qvlm.export import ACTIVATION_SIDECAR, BITSANDBYTES, README, export_refusal, save_quantized
from qvlm.models.inference import generate_answers
from qvlm.quant import QuantConfig, quantize
from qvlm.quant.packing import PackedLinear
from tests.plain_transformers import plain_answers, plain_load

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def exported(bundled, tmp_path_factory):
    cfg = QuantConfig.from_bits("W4A4", recipe="qlora", calib_size=8)
    result = quantize(bundled, cfg)
    root = tmp_path_factory.mktemp("bnb")
    folder = save_quantized(result.handle, root / "variant", cfg.to_dict(), result.to_dict(), format=BITSANDBYTES)
    save_quantized(result.handle, root / "float-tower", cfg.to_dict(), result.to_dict(), format=BITSANDBYTES,
                   rotated_tower="float")
    return result, folder


def _float_tower(folder):
    return folder.parent / "float-tower"


def _set_activation_quantization(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.act is not None:
            m.act.enabled = on


@pytest.mark.parametrize("tower", ["nf4", "float"])
def test_plain_from_pretrained_makes_linear4bit_of_exactly_the_nf4_layers_with_the_runs_weights(exported, tower):
    result, folder = exported
    folder = folder if tower == "nf4" else _float_tower(folder)
    model, _ = plain_load(folder)
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes" and qconfig["load_in_4bit"] is True
    assert qconfig["bnb_4bit_quant_type"] == "nf4" and qconfig["bnb_4bit_use_double_quant"] is False
    ours = {n: m for n, m in result.handle.model.named_modules() if isinstance(m, PackedLinear)}
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    rotated = {n for n, m in ours.items() if m.act is not None and m.act.rotation is not None}
    assert rotated and all(n.startswith("model.vision_tower") for n in rotated)  # the recommended preset rotates
    assert set(four_bit) == (set(ours) if tower == "nf4" else set(ours) - rotated)
    plain = dict(model.named_modules())
    for name in rotated:  # the un-rotated weight the run computes with, Q(W R) R^T: as floats, or NF4 of it
        m = ours[name]
        expected = m.dequantized_weight() @ m.act.rotation.to(m.dequantized_weight().dtype).T
        if tower == "float":
            assert type(plain[name]) is torch.nn.Linear
            torch.testing.assert_close(plain[name].weight.data, expected.to(plain[name].weight.dtype))
            continue
        state = plain[name].weight.quant_state
        got = bnb.functional.dequantize_4bit(plain[name].weight.data, state).float()
        codes, again = bnb.functional.quantize_4bit(expected.float(), blocksize=64, quant_type="nf4")
        torch.testing.assert_close(got, bnb.functional.dequantize_4bit(codes, again).float(), atol=2e-3, rtol=2e-3)
        # one rounding more: within half an NF4 step of the block's absmax (the widest gap is ~0.3 of it)
        assert (got - expected).abs().max() <= 0.16 * expected.abs().max()
    for name, m in four_bit.items():
        if name in rotated:
            continue
        state = m.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64
        weight = bnb.functional.dequantize_4bit(m.weight.data, state)
        assert weight.dtype == torch.float16  # the checkpoint's own dtype, which the plain load keeps
        torch.testing.assert_close(weight, ours[name].dequantized_weight().to(weight.dtype), msg=name)
    assert type(model.lm_head) is torch.nn.Linear  # what the run kept in FP stays FP


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_generate_answers_after_plain_from_pretrained(exported, no_grad):
    _, folder = exported
    answers = plain_answers(folder, no_grad)
    assert len(answers) == 2 and all(a.strip() for a in answers)


def test_answers_agree_with_our_packed_model(exported, capsys):
    """Weight-only on both sides (the float tower, exactly the run's weights): every answer equal. With our
    activations quantized (W4A4 against the file's W4A16) most still agree; the count is printed for the report."""
    result, folder = exported
    model, processor = plain_load(_float_tower(folder))
    samples = evaluation_subset(12, seed=7)
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    theirs = generate_answers(model, processor, images, questions)
    ours_w4a4 = generate_answers(result.handle.model, result.handle.processor, images, questions)
    _set_activation_quantization(result.handle.model, False)
    try:
        ours_w4a16 = generate_answers(result.handle.model, result.handle.processor, images, questions)
    finally:
        _set_activation_quantization(result.handle.model, True)
    assert theirs == ours_w4a16
    agree = sum(a == b for a, b in zip(theirs, ours_w4a4))
    with capsys.disabled():
        print(f"\nbitsandbytes vs our packed W4A4: {agree}/{len(theirs)} answers agree; vs W4A16: "
              f"{sum(a == b for a, b in zip(theirs, ours_w4a16))}/{len(theirs)}")
    assert agree >= len(theirs) // 2


def test_the_folder_says_w4a16_and_keeps_the_activation_ranges(exported):
    result, folder = exported
    readme = (folder / README).read_text()
    assert "W4A16" in readme and "from_pretrained(" in readme and "bitsandbytes" in readme
    sidecar = json.loads((folder / ACTIVATION_SIDECAR).read_text())
    assert sidecar["applied_by_loader"] is False and sidecar["modules"]


def test_only_nf4_variants_are_written(bundled, tmp_path):
    rtn = QuantConfig.from_bits("W4A4", recipe="rtn", calib_size=8)
    assert "NF4" in export_refusal(rtn, BITSANDBYTES)
    assert "4-bit" in export_refusal(QuantConfig.from_bits("W3A4", recipe="qlora"), BITSANDBYTES)
    assert export_refusal(QuantConfig.from_bits("W4A4", recipe="qvlm"), BITSANDBYTES) is None
    result = quantize(bundled, rtn)
    with pytest.raises(ValueError, match="NF4"):
        save_quantized(result.handle, tmp_path / "x", rtn.to_dict(), format=BITSANDBYTES)


def test_cli_quantize_saves_bitsandbytes(tmp_path, bundled_dir, capsys):
    from qvlm.cli import main

    save = tmp_path / "bnb"
    assert main(["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--method", "qlora", "--calib-size", "8",
                 "--out", str(tmp_path / "run"), "--save", str(save), "--format", "bitsandbytes"]) == 0
    assert "bitsandbytes" in capsys.readouterr().out
    model, _ = plain_load(save)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
