"""Packed storage and export/reload: real bytes, bit-exact answers, clear errors on bad folders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvlm.data import evaluation_subset
from qvlm.export import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    ExportError,
    load_quantized,
    load_model,
    save_quantized,
)
from qvlm.models.inference import generate_answers, prepare_inputs
from qvlm.quant import QuantConfig, quantize
from qvlm.quant.memory import weight_memory
from qvlm.quant.packing import PackedLinear


@pytest.fixture(scope="module", params=[("W4A4", "qvlm"), ("W3A3", "qlora")], ids=["w4a4-qvlm", "w3a3-qlora-nf"])
def exported(request, bundled, tmp_path_factory):
    bits, recipe = request.param
    cfg = QuantConfig.from_bits(bits, recipe=recipe, calib_size=8, veo_epochs=1)
    result = quantize(bundled, cfg)
    folder = save_quantized(result.handle, tmp_path_factory.mktemp(recipe), cfg.to_dict(), result.to_dict())
    return result, folder


def test_quantized_weights_are_really_packed(exported, bundled):
    result, _ = exported
    layers = [m for m in result.handle.model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == sum(1 for _ in bundled.layer_map.linears())
    mem = weight_memory(result.handle.model)
    held = sum(m.storage_bytes() for m in layers)
    fp16 = sum(2 * m.in_features * m.out_features for m in layers)
    bits = result.config.w_bits
    assert held < fp16 * (bits + 0.75) / 16  # codes plus per-channel steps or one float32 absmax per 64
    assert mem.quant_bytes < mem.fp16_bytes


def test_reload_is_bit_exact(exported):
    result, folder = exported
    again = load_quantized(folder)
    samples = evaluation_subset(12, seed=5)
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    batch = prepare_inputs(again.processor, images[:4], questions[:4])
    with torch.no_grad():
        assert torch.equal(result.handle.model(**batch).logits, again.model(**batch).logits)
    assert generate_answers(again.model, again.processor, images, questions) == generate_answers(
        result.handle.model, result.handle.processor, images, questions)


def test_export_holds_no_pickle_and_records_the_config(exported):
    result, folder = exported
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert QuantConfig.from_dict(manifest["quant_config"]) == result.config


def test_bad_export_folders_give_clear_errors(exported, tmp_path):
    _, folder = exported
    with pytest.raises(ExportError, match="No export folder"):
        load_quantized(tmp_path / "missing")
    with pytest.raises(ExportError, match="is missing"):
        load_quantized(tmp_path)

    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="corrupted"):
        load_quantized(corrupt)

    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    tensors = load_file(str(partial / WEIGHTS))
    tensors.pop(next(k for k in tensors if k.endswith(".packed")))
    save_file(tensors, str(partial / WEIGHTS))
    with pytest.raises(ExportError, match="partial"):
        load_quantized(partial)

    future = tmp_path / "future"
    shutil.copytree(folder, future)
    manifest = json.loads((future / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (future / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="version"):
        load_quantized(future)


def test_cli_save_then_reload_through_the_model_loader(tmp_path, bundled_dir, capsys):
    import qvlm
    from qvlm.cli import main
    from qvlm.models import ModelLoadError, load_vlm

    save = tmp_path / "saved"
    assert main(["quantize", "--model", str(bundled_dir), "--bits", "w4a4", "--method", "rtn",
                 "--calib-size", "8", "--out", str(tmp_path / "run"), "--save", str(save)]) == 0
    assert "saved the model (qvlm-packed)" in capsys.readouterr().out
    handle = load_model(save)  # what the app's model picker and the CLI call
    assert any(isinstance(m, PackedLinear) for m in handle.model.modules())
    assert isinstance(qvlm.load_quantized(save).model, type(handle.model))
    assert isinstance(load_model(bundled_dir).model, type(handle.model))  # checkpoints too
    # the checkpoint loader never reads packed codes as weights (they would load as random layers)
    with pytest.raises(ModelLoadError, match="packed export"):
        load_vlm(save)


def test_version_1_exports_still_load(exported, tmp_path):
    """Version 1 spelled NormalFloat "nf" and stored its absmax as [out, in / 64]; same numbers, same order."""
    import shutil

    result, folder = exported
    old = tmp_path / "v1"
    shutil.copytree(folder, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 1
    tensors = load_file(str(old / WEIGHTS))
    for name, entry in manifest["modules"].items():
        if entry["format"] == "nf4":
            entry["format"] = "nf"
            out_f, in_f = entry["shape"]
            tensors[f"{name}.scale"] = tensors[f"{name}.scale"].reshape(out_f, in_f // entry["group"])
    (old / MANIFEST).write_text(json.dumps(manifest))
    save_file(tensors, str(old / WEIGHTS))
    again = load_quantized(old)
    assert {m.fmt for m in again.model.modules() if isinstance(m, PackedLinear)} == {"nf4"}  # qvlm, qlora: NormalFloat
    batch = prepare_inputs(again.processor, [s.load_image() for s in evaluation_subset(2, seed=1)],
                           [s.question for s in evaluation_subset(2, seed=1)])
    with torch.no_grad():
        assert torch.equal(result.handle.model(**batch).logits, again.model(**batch).logits)


def test_clipped_dynamic_ranges_travel_with_the_export(bundled, tmp_path, monkeypatch):
    """act_dynamic_clip's factors are part of the model: a reload holds them and answers bit for bit the same
    (on the simulated path, so that the comparison does not depend on which kernels this machine times faster)."""
    from qvlm.quant.quantizers import ActQuantizer

    monkeypatch.setenv("QVLM_KERNELS", "simulated")
    cfg = QuantConfig.from_bits("W4A4", recipe="qvlm", preset="integer", act_dynamic_clip="lp", calib_size=8,
                                veo_epochs=1, veo_holdout_images=0)
    result = quantize(bundled, cfg)
    folder = save_quantized(result.handle, tmp_path / "clip", cfg.to_dict(), result.to_dict())
    again = load_quantized(folder)

    def clips(model):
        return [float(m.clip) for m in model.modules() if isinstance(m, ActQuantizer) and m.clip is not None]

    assert clips(again.model) == clips(result.handle.model) and len(clips(again.model)) > 0
    samples = evaluation_subset(4, seed=5)
    batch = prepare_inputs(again.processor, [s.load_image() for s in samples], [s.question for s in samples])
    with torch.no_grad():
        assert torch.equal(result.handle.model(**batch).logits, again.model(**batch).logits)
