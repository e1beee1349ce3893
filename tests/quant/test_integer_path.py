"""The integer path where answers are served: a reloaded export picks it, a held variant answers on it, the CLI says it."""

from __future__ import annotations

import os

import pytest

from qvlm.data import evaluation_subset
from qvlm.export import load_model, load_quantized, save_quantized
from qvlm.models.inference import generate_answers
from qvlm.quant import QuantConfig, quantize
from qvlm.quant.integer import IntegerLinear, execution_path, integer_handle
from qvlm.quant.memory import weight_memory
from qvlm.quant.packing import PackedLinear


@pytest.fixture(autouse=True, scope="module")
def integer_wherever_it_factors():
    """These tests follow the integer path itself; whether it is faster here is tests/quant/test_kernels.py's question."""
    saved = os.environ.get("QVLM_KERNELS")
    os.environ["QVLM_KERNELS"] = "integer"
    yield
    os.environ.pop("QVLM_KERNELS") if saved is None else os.environ.__setitem__("QVLM_KERNELS", saved)


def _export(bundled, folder, bits: str, recipe: str, preset: str = "recommended"):
    cfg = QuantConfig.from_bits(bits, recipe=recipe, preset=preset, calib_size=4, calib_batch=4, veo_epochs=1)
    result = quantize(bundled, cfg)
    save_quantized(result.handle, folder, cfg.to_dict(), result.to_dict())
    return result


@pytest.fixture(scope="module")
def deployable(bundled, tmp_path_factory):
    """A W8A8 rtn run with the deployable preset, and its packed export."""
    folder = tmp_path_factory.mktemp("deployable")
    return _export(bundled, folder, "W8A8", "rtn", preset="deployable"), folder


def _questions(n: int = 8):
    samples = evaluation_subset(n, seed=11)
    return [s.load_image() for s in samples], [s.question for s in samples]


def test_deployable_export_reloads_on_integer_kernels_and_answers_like_the_saved_model(deployable):
    result, folder = deployable
    again = load_quantized(folder)
    assert again.execution_path.startswith("integer kernels (") and again.simulated_layers == {}
    assert execution_path(again.model) == again.execution_path
    assert not any(isinstance(m, PackedLinear) for m in again.model.modules())
    assert {n for n, _ in again.layer_map.linears()} == {n for n, m in again.model.named_modules()
                                                          if isinstance(m, IntegerLinear)}
    images, questions = _questions()
    assert execution_path(result.handle.model) == "simulated"
    ours = generate_answers(result.handle.model, result.handle.processor, images, questions)
    assert generate_answers(again.model, again.processor, images, questions) == ours and all(ours)


def test_nf4_export_reloads_off_integer_kernels_and_says_why(bundled, tmp_path):
    _export(bundled, tmp_path, "W4A4", "qlora")
    again = load_model(tmp_path)
    assert "integer kernels" not in again.execution_path  # float or simulated per shape, as timed (may be mixed)
    assert execution_path(again.model) == again.execution_path
    assert again.simulated_layers and all("NormalFloat" in why for why in again.simulated_layers.values())


def test_a_held_variant_answers_on_integer_kernels_and_stays_packed(deployable):
    result, _ = deployable
    before = weight_memory(result.handle.model)
    answering = integer_handle(result.handle)
    assert answering.execution_path.startswith("integer kernels (") and integer_handle(result.handle) is answering
    assert execution_path(result.handle.model) == "simulated"  # still exportable and measurable
    assert weight_memory(result.handle.model) == before
    shared = {id(p) for p in result.handle.model.parameters()}
    kept = [p for m in answering.model.modules() if not isinstance(m, IntegerLinear) for p in m.parameters(False)]
    assert kept and all(id(p) in shared for p in kept)  # no second copy of the FP tensors
    images, questions = _questions()
    assert generate_answers(answering.model, answering.processor, images, questions) == generate_answers(
        result.handle.model, result.handle.processor, images, questions)


def test_cli_eval_of_an_export_prints_the_path(deployable, capsys):
    from qvlm.cli import main

    _, folder = deployable
    assert main(["eval", "--model", str(folder), "--limit", "4"]) == 0
    printed = capsys.readouterr().out
    assert "answers/second" in printed and "on integer kernels" in printed
