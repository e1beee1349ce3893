"""Kernel choice (qvlm/quant/kernels.py): checked sums, measured choice, the fastest exact candidate runs.

Timings are injected here: the logic is pinned, not this machine's speed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qvlm.quant import kernels
from qvlm.quant.integer import IntegerLinear, choose_kernel, execution_path, to_integer_path
from qvlm.quant.kernels import ACCUMULATORS, Accumulator, accumulator_error, choose
from qvlm.quant.packing import PackedLinear
from qvlm.quant.quantizers import ActQuantizer, encode_weight
from tests.kernel_timers import fixed_timer, speeds


def _layer(w_bits: int = 4, a_bits: int = 4, granularity: str = "tensor", k: int = 96, n: int = 24,
           fmt: str = "uniform") -> PackedLinear:
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(3, 5, k, generator=g)
    act = ActQuantizer(a_bits, granularity)
    view = act.stat_view(x)
    act.set_range(view.amin(0), view.amax(0))
    return PackedLinear.from_encoded(encode_weight(torch.randn(n, k, generator=g), w_bits, fmt, None), torch.randn(n),
                                     act, None, torch.float32)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_every_accumulator_this_machine_has_sums_low_bit_codes_exactly(bits):
    layer = IntegerLinear.from_packed(_layer(bits, bits))
    for acc in ACCUMULATORS.values():
        if acc.unavailable() is None:
            assert accumulator_error(acc, layer.codes, bits) is None, acc.name


def test_an_accumulator_that_saturates_is_rejected_by_the_check():
    exact = ACCUMULATORS["float-codes"]
    saturating = Accumulator("saturating", "16-bit pair sums", lambda: None, exact.prepare,
                             lambda state, x: (x @ state.t()).clamp(-(2**15) * 8, 2**15 * 8))
    codes = IntegerLinear.from_packed(_layer(8, 8, k=512)).codes
    assert accumulator_error(exact, codes, 8) is None
    assert "misses the exact sums" in accumulator_error(saturating, codes, 8)


def test_a_slow_integer_kernel_loses_to_the_float_path():
    layer = _layer()
    choice = choose(layer, lambda name: IntegerLinear.from_packed(layer, accumulator=name), None,
                    timer=fixed_timer(speeds(int_mm=15.0, fbgemm=1.3, onednn=1.2, float_codes=1.15)))
    assert choice.backend == "float"
    assert "slower than float32" in choice.rejected["int_mm"] and "slower than float" in choice.rejected["fbgemm"]


def test_a_fast_integer_kernel_wins_and_the_fastest_one_is_kept():
    layer = _layer()
    set_speeds = speeds(fbgemm=0.5, onednn=0.4, int_mm=9.0, float_codes=1.05)
    available = {n for n, a in ACCUMULATORS.items() if a.unavailable() is None}
    choice = choose(layer, lambda name: IntegerLinear.from_packed(layer, accumulator=name), None,
                    timer=fixed_timer(set_speeds))
    expected = min((n for n in available if set_speeds[n] < 1.0), key=set_speeds.get, default="float")
    assert choice.backend == expected and choice.integer == (expected in ACCUMULATORS)
    assert choice.fp_score == pytest.approx(sum(1.0 for _ in kernels.TIMING_ROWS))


def test_an_integer_kernel_faster_than_the_float_path_wins_even_where_nothing_beats_fp32():
    """Small widths: every quantized path is slower than the FP Linear; the fastest of them still runs."""
    layer = _layer()
    choice = choose(layer, lambda name: IntegerLinear.from_packed(layer, accumulator=name), None,
                    timer=fixed_timer(speeds(float_=1.6, int_mm=1.2, fbgemm=1.3, onednn=1.4, float_codes=1.5)))
    available = {n for n, a in ACCUMULATORS.items() if a.unavailable() is None}
    assert choice.backend == "int_mm" and choice.integer and "1.20x the FP Linear's time" in choice.reason
    assert all("slower than int_mm" in choice.rejected[n] for n in available - {"int_mm"})


def test_a_layer_whose_grid_does_not_factor_only_has_float_paths():
    layer = _layer(granularity="channel")
    choice = choose_kernel(layer, timer=fixed_timer(speeds(float_=3.0, simulated=2.0, fbgemm=0.1)))
    assert choice.backend == "simulated" and not choice.integer
    assert all("per-input-channel" in why for why in choice.rejected.values())


def test_policies_and_a_bad_one():
    layer = _layer()
    assert choose_kernel(layer, policy="float").backend == "float"
    assert choose_kernel(layer, policy="integer", timer=fixed_timer(speeds(int_mm=40.0))).integer
    with pytest.raises(ValueError, match="kernel policy"):
        choose_kernel(layer, policy="fastest")


def test_to_integer_path_applies_each_choice_and_the_path_names_the_backends():
    model = nn.Sequential(_layer(), _layer(granularity="channel", k=24))
    before = model(torch.randn(2, 3, 96))
    report = to_integer_path(model, timer=fixed_timer(speeds(float_codes=0.5)))
    assert report["backends"] == {"0": "float-codes", "1": "float"}
    assert isinstance(model[0], IntegerLinear) and model[1].dequantized is not None
    assert execution_path(model) == ("mixed: 1 on integer kernels (float-codes), 1 float (weights dequantized once), "
                                     "of 2 Linears")
    assert model(torch.randn(2, 3, 96)).shape == before.shape


def test_the_float_path_answers_bit_for_bit_like_the_simulated_one():
    layer = _layer(granularity="channel")
    x = torch.randn(4, 7, 96)
    with torch.no_grad():
        simulated = layer(x)
        layer.hold_dequantized()
        assert torch.equal(layer(x), simulated)
        assert "dequantized" not in layer.state_dict()  # exports keep reading the packed codes
        layer.hold_dequantized(False)
        assert layer.dequantized is None


@pytest.mark.parametrize("bits", [4, 8])
def test_integer_layers_on_every_accumulator_give_the_same_output(bits):
    layer = _layer(bits, bits, granularity="tensor")
    x = torch.randn(2, 9, 96)
    outputs = {}
    for name, acc in ACCUMULATORS.items():
        built = IntegerLinear.from_packed(layer, accumulator=name)
        if acc.unavailable() is None and accumulator_error(acc, built.codes, bits) is None:
            outputs[name] = built(x)
    reference = outputs.pop("int_mm")
    for name, y in outputs.items():
        assert torch.equal(y, reference), name


def test_choices_are_cached_per_machine_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLM_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    layer = _layer()
    first = choose_kernel(layer)  # measured on this machine, then written
    data = json.loads((tmp_path / "kernels.json").read_text())
    key = kernels.machine_key()
    assert list(data) == [key] and "torch" in key and "threads" in key
    assert f"measure:{kernels.layer_signature(layer)}" in data[key]

    def must_not_time(*_):
        raise AssertionError("a cached choice is not measured again")

    monkeypatch.setattr(kernels, "time_forward", must_not_time)
    assert choose_kernel(layer) == first


def _wanting_float(*layers: PackedLinear, saved: tuple[float, ...]) -> dict:
    """Each layer wanting the float path, its choice saying it saves ``saved[i]`` seconds per row when held."""
    return {str(i): (m, kernels.KernelChoice("float", "test", {"float": 1.0, "simulated": 1.0 + s}))
            for i, (m, s) in enumerate(zip(layers, saved))}


def test_the_memory_cap_holds_the_layers_that_save_most_and_stays_under_the_fp_model():
    from qvlm.quant.integer import hold_within_cap
    from qvlm.quant.memory import fp_model_bytes, resident_bytes

    model = nn.Sequential(*(_layer(granularity="channel", k=96, n=96) for _ in range(2)))
    report = hold_within_cap(model, _wanting_float(*model, saved=(0.1, 0.9)), "fp")
    # two equal weights, codes and ranges already held: one dequantized copy fits under the FP model, not two
    assert set(report["not_held"]) == {"0"} and "QVLM_MEMORY=fp" in report["not_held"]["0"]
    assert model[1].dequantized is not None and model[0].dequantized is None
    assert resident_bytes(model) <= fp_model_bytes(model) and report["held_bytes"] == 96 * 96 * 4

    report = hold_within_cap(model, _wanting_float(*model, saved=(0.1, 0.9)), "packed")
    assert report["held_bytes"] == 0 and all(m.dequantized is None for m in model)
    hold_within_cap(model, _wanting_float(*model, saved=(0.1, 0.9)), "unlimited")
    assert all(m.dequantized is not None for m in model)
    with pytest.raises(ValueError, match="memory cap"):
        hold_within_cap(model, {}, "small")


def test_to_integer_path_under_the_packed_cap_keeps_codes_only_and_says_why(monkeypatch):
    model = nn.Sequential(_layer(granularity="channel"), _layer(granularity="channel", k=24))
    monkeypatch.setenv("QVLM_MEMORY", "packed")
    report = to_integer_path(model, timer=fixed_timer(speeds()))
    assert report["backends"] == {"0": "simulated", "1": "simulated"} and report["memory"]["held_bytes"] == 0
    assert all("QVLM_MEMORY=packed" in why for why in report["simulated"].values())
    assert execution_path(model) == "simulated"
    monkeypatch.setenv("QVLM_MEMORY", "lots")
    with pytest.raises(ValueError, match="QVLM_MEMORY"):
        to_integer_path(model, timer=fixed_timer(speeds()))


def test_the_fp_model_bytes_of_a_packed_model_are_those_its_fp_model_holds():
    from qvlm.quant.memory import fp_model_bytes, resident_bytes

    fp = nn.Sequential(nn.Linear(96, 24), nn.LayerNorm(24))
    act = ActQuantizer(4, "channel")
    act.set_range(-torch.ones(96), torch.ones(96))
    packed = PackedLinear.from_encoded(encode_weight(fp[0].weight.detach(), 4, "uniform", None), fp[0].bias, act,
                                       None, torch.float32)
    assert fp_model_bytes(nn.Sequential(packed, fp[1])) == resident_bytes(fp)
