"""What an export must carry besides its weights: the task its model was trained for and the model's own dtype.

Why a test per format: a mosaic variant saved without its task was scored on easy-VQA after reloading (26% instead
of 83%), and floats written in float32 made a "4-bit" download bigger than the FP16 model it came from.
"""

import json

import pytest
import torch
from safetensors import safe_open

from qvlm.data import get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.export import (
    FORMAT_NAME,
    MANIFEST,
    SAVE_FORMATS,
    WEIGHTS,
    export_refusal,
    load_model,
    load_quantized,
    save_quantized,
)
from qvlm.export.checkpoints import ROTATION_PREFIX
from qvlm.models import load_vlm, task_note
from qvlm.quant import QuantConfig, quantize


def config_for(format: str) -> QuantConfig:
    """A small W4A4 run this format can hold: qvlm (NF4) where it fits, rtn (uniform weights) otherwise."""
    for recipe in ("qvlm", "rtn"):
        cfg = QuantConfig.from_bits("W4A4", recipe=recipe, calib_size=4, veo_epochs=1)
        if export_refusal(cfg, format) is None:
            return cfg
    raise AssertionError(f"no small recipe fits {format}")


@pytest.fixture(scope="module")
def tiny_mosaic(tiny_mosaic_dir):
    return load_vlm(tiny_mosaic_dir)


@pytest.fixture(scope="module", params=SAVE_FORMATS)
def saved(request, tiny_mosaic, tmp_path_factory):
    cfg = config_for(request.param)
    result = quantize(tiny_mosaic, cfg)
    folder = save_quantized(result.handle, tmp_path_factory.mktemp(request.param), cfg.to_dict(), result.to_dict(),
                            format=request.param)
    return request.param, result, folder


def test_every_format_records_the_task_and_the_loader_reads_it(saved, tiny_mosaic):
    format, result, folder = saved
    assert tiny_mosaic.task == "mosaic" and result.handle.task == "mosaic"
    again = load_model(folder)
    assert again.task == "mosaic" and again.task_recorded
    assert task_note(again) is None
    assert "trained for mosaic" in task_note(again, "easy-vqa")


def test_packed_reload_answers_the_same_questions_identically(saved):
    format, result, folder = saved
    if format != FORMAT_NAME:
        pytest.skip("only the packed format reloads bit for bit; plain formats are W4A16 (see their README)")
    samples = get_task("mosaic").evaluation_subset(24)
    again = load_model(folder)
    before = evaluate(result.handle.model, result.handle.processor, samples)
    after = evaluate(again.model, again.processor, samples)
    assert before.predictions == after.predictions and before.accuracy == after.accuracy


def test_floats_are_written_in_the_models_own_dtype(saved, tiny_mosaic):
    format, _, folder = saved
    stored = tiny_mosaic.save_dtype
    assert stored == torch.float16  # the training tools save the bundled models in float16
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    exact_float32 = ("act.lo", "act.hi", ".scale", "absmax", "weight_scale", "quant_state", "quant_map", "rotation")
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        wide = [k for k in f.keys() if f.get_slice(k).get_dtype() in ("F32", "F64")
                and not any(part in k for part in exact_float32)]
    if format == FORMAT_NAME:  # steps and ranges stay float32; the model's own floats go back to float16
        assert not [k for k in wide if "embed" in k or "norm" in k], wide
    else:
        assert not wide, wide


def test_a_rotation_shared_by_many_layers_is_stored_once(tiny_mosaic, tmp_path):
    cfg = QuantConfig.from_bits("W4A4", recipe="rtn", calib_size=4)
    assert cfg.vision_rotation == "hadamard"
    result = quantize(tiny_mosaic, cfg)
    folder = save_quantized(result.handle, tmp_path / "rotated", cfg.to_dict(), result.to_dict())
    manifest = json.loads((folder / MANIFEST).read_text())
    keys = [e["act"]["rotation_key"] for e in manifest["modules"].values() if e["act"] and "rotation_key" in e["act"]]
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        stored = [k for k in f.keys() if k.startswith(ROTATION_PREFIX)]
    assert len(keys) > len(stored) >= 1  # several layers, one matrix per input width
    assert set(keys) == set(stored)
    # and held once in memory, by the run's result and by the reloaded model alike
    for model in (result.handle.model, load_quantized(folder, device="cpu").model):
        rotations = [m.rotation for m in model.modules() if isinstance(getattr(m, "rotation", None), torch.Tensor)]
        assert len({r.untyped_storage().data_ptr() for r in rotations}) == len(stored) < len(rotations)


def test_size_sentences_are_what_du_and_a_plain_load_measure(saved, tiny_mosaic, tiny_mosaic_dir):
    import subprocess

    from qvlm.export.sizes import resident_bytes, size_report
    from tests.plain_transformers import plain_load

    format, _, folder = saved
    plain = format != FORMAT_NAME
    report = size_report(folder, plain, fp_model=tiny_mosaic.model, fp_folder=tiny_mosaic_dir)
    du = int(subprocess.run(["du", "-b", "-s", str(folder)], capture_output=True, text=True, check=True).stdout.split()[0])
    assert report.files == du
    if plain:
        model, _ = plain_load(folder)
        assert report.loaded == resident_bytes(model) == sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    sentence = report.sentence()
    assert f"{du:,} bytes (du -b)" in sentence and f"{report.loaded:,} bytes" in sentence
