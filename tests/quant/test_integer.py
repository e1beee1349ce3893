"""The integer execution path (qvlm/quant/integer.py): exact integer sums, outputs equal to the simulated path."""

from __future__ import annotations

import pytest
import torch

from qvlm.quant.integer import (
    IntegerLinear,
    act_codes,
    correction_dtype,
    execution_path,
    refusal,
    rescale,
    to_integer_path,
)
from qvlm.quant.kernels import MAX_INT_MM_K, int_matmul
from qvlm.quant.packing import PackedLinear
from qvlm.quant.quantizers import ActQuantizer, encode_weight
from tests.kernel_timers import fixed_timer, speeds

EPS32 = 2.0**-24  # float32 unit roundoff


def _packed(out_f: int, in_f: int, w_bits: int, a_bits: int, granularity: str, tokens: int = 6,
            fmt: str = "uniform", group: int | None = None, seed: int = 0) -> tuple[PackedLinear, torch.Tensor]:
    """A random PackedLinear with calibrated static activation ranges, and a [2, tokens, in] input."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(2, tokens, in_f, generator=g) * 2 + 0.3
    act = ActQuantizer(a_bits, granularity)
    view = act.stat_view(x)
    act.set_range(view.amin(0) * 0.9, view.amax(0) * 0.9)  # clip a little, so codes saturate too
    packed = PackedLinear.from_encoded(encode_weight(w, w_bits, fmt, group), torch.randn(out_f, generator=g), act,
                                       None, torch.float32)
    return packed, x


def test_int_mm_on_this_cpu_takes_int8_of_any_shape_and_sums_exactly():
    g = torch.Generator().manual_seed(1)
    for m, k, n in [(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 256, 48)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        acc = int_matmul(a, b)
        assert acc.dtype == torch.int32
        assert torch.equal(acc.long(), a.long() @ b.long().t())
    # the worst case of a 4096-wide row: every product is (-128)^2
    a = torch.full((2, 4096), -128, dtype=torch.int8)
    assert int(int_matmul(a, a)[0, 0]) == 4096 * 128 * 128
    # rows longer than the int32 accumulator allows are summed in chunks, in int64
    long_row = torch.full((2, MAX_INT_MM_K + 5), -128, dtype=torch.int8)
    assert int(int_matmul(long_row, long_row)[0, 0]) == (MAX_INT_MM_K + 5) * 128 * 128
    assert correction_dtype(11008, 8, 8) == torch.int32 and correction_dtype(40000, 8, 8) == torch.int64
    with pytest.raises(RuntimeError):
        torch._int_mm(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(8, 4, dtype=torch.uint8))


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
def test_activation_codes_are_the_ones_the_fake_quantizer_rounds_to(granularity):
    packed, x = _packed(8, 96, 8, 8, granularity, tokens=40)
    act = packed.act
    scale, zero = act.grid()
    shape = act.broadcast_shape(x.dim(), scale.numel())
    codes = act_codes(x, scale.view(shape), zero.view(shape), act.bits)
    assert torch.equal((codes - zero.view(shape)) * scale.view(shape), act(x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_integer_accumulation_equals_the_exact_int64_sum(bits, granularity):
    packed, x = _packed(24, 200, bits, bits, granularity)
    layer = IntegerLinear.from_packed(packed)
    rows = x.reshape(-1, 200)
    scale_x, zero_x = layer.row_grid(x, rows)
    qx = act_codes(rows, scale_x.unsqueeze(1), zero_x.unsqueeze(1), bits).long()
    qw = (layer.codes.long() - layer.w_zero.long().unsqueeze(1))          # qw - z_w, shift cancels
    exact = (qx - zero_x.long().unsqueeze(1)) @ qw.t()                     # sum_i (qx - z_x)(qw - z_w), int64
    shift = 128 if bits == 8 else 0
    codes_x = (qx - shift).to(torch.int8)
    acc = int_matmul(codes_x, layer.codes)
    assert torch.equal(acc.long(), codes_x.long() @ layer.codes.long().t())
    # the zero-point corrections, with unit steps: the bracket (< 2^24 here, so exact in float32)
    ones_x, ones_w = torch.ones(rows.shape[0]), torch.ones(24)
    bracket = rescale(acc, codes_x.sum(1, dtype=torch.int32), zero_x.int() - shift, layer.w_sum, layer.w_zero, 200,
                      ones_x, ones_w, None, layer.sum_dtype)
    assert exact.abs().max() < 2**24 and torch.equal(bracket, exact.float())


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_integer_linear_outputs_equal_the_simulated_path_within_float_rounding(bits, granularity):
    """Tolerance: both compute the same exact sum s_x s_w sum_i (qx - z_x)(qw - z_w); the simulated
    path in float32 with K products and K - 1 additions, each rounding by at most u = 2^-24, so it
    is within (K + 3) u sum_i |x_hat w_hat| of it (the usual dot-product bound); ours rounds 3 times."""
    w_bits, a_bits = bits
    packed, x = _packed(48, 320, w_bits, a_bits, granularity)
    layer = IntegerLinear.from_packed(packed)
    assert layer is not None and layer.storage_bytes() == 48 * 320 + 3 * 4 * 48
    with torch.no_grad():
        want = packed(x)
        got = layer(x)
        bound = (packed.act(x).abs() @ packed.dequantized_weight().abs().t()) * (320 + 8) * EPS32
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.all((got - want).abs() <= bound + want.abs() * 4 * EPS32)
    assert torch.equal(layer.dequantized_weight(), packed.dequantized_weight())


def test_dynamic_per_token_grid_quantizes_each_row_by_its_own_range():
    packed, x = _packed(16, 64, 8, 8, "channel")
    layer = IntegerLinear.from_packed(packed, dynamic=True)
    rows = x.reshape(-1, 64)
    lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 255
    zero = torch.round(-lo / step)
    x_hat = ((torch.clamp(torch.round(rows * (1 / step)) + zero, 0, 255) - zero) * step).reshape(x.shape)
    with torch.no_grad():
        want = torch.nn.functional.linear(x_hat, packed.dequantized_weight(), packed.bias)
        got = layer(x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("bits,clip", [((8, 8), None), ((4, 4), None), ((4, 4), 0.8), ((8, 8), 0.9)])
def test_a_dynamic_token_layer_runs_on_integer_kernels_with_the_simulated_codes(bits, clip):
    """The simulated dynamic ActQuantizer and the integer path take the same grid (dynamic_grid, with the clip
    factor when the range has one) and codes (act_codes), so only the float rounding of the sum differs (bound
    as in the static test above)."""
    w_bits, a_bits = bits
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(48, 320, generator=g), torch.randn(2, 6, 320, generator=g) * 2 + 0.3
    act = ActQuantizer(a_bits, "dynamic_token")
    if clip is not None:
        act.set_clip(clip)
    packed = PackedLinear.from_encoded(encode_weight(w, w_bits, "uniform", None), None, act, None, torch.float32)
    assert refusal(packed) is None
    layer = IntegerLinear.from_packed(packed)
    assert layer.act_mode == "dynamic" and layer.a_bits == a_bits
    assert (layer.act_clip is None) == (clip is None)
    with torch.no_grad():
        want, got = packed(x), layer(x)
        bound = (packed.act(x).abs() @ packed.dequantized_weight().abs().t()) * (320 + 8) * EPS32
    assert torch.all((got - want).abs() <= bound + want.abs() * 4 * EPS32)


def test_formats_that_do_not_factor_are_refused_with_a_reason():
    cases = {
        "NormalFloat": _packed(8, 64, 4, 4, "tensor", fmt="nf4", group=64)[0],
        "grouped": _packed(8, 128, 4, 4, "tensor", group=32)[0],
        "per-input-channel": _packed(8, 64, 8, 8, "channel")[0],
    }
    for words, packed in cases.items():
        assert words in refusal(packed)
        assert IntegerLinear.from_packed(packed) is None
    weight_only = PackedLinear.from_encoded(encode_weight(torch.randn(8, 64), 4, "uniform", None), None, None,
                                            None, torch.float32)
    assert "not quantized" in refusal(weight_only)
    assert refusal(weight_only, dynamic=True, act_bits=8) is None
    sixteen = _packed(8, 64, 8, 8, "tensor")[0]
    sixteen.act.bits = 16
    assert "16-bit activations" in refusal(sixteen)
    token = IntegerLinear.from_packed(_packed(8, 64, 8, 8, "token", tokens=6)[0])
    with pytest.raises(ValueError, match="6 token positions"):
        token(torch.randn(1, 5, 64))


def test_to_integer_path_swaps_eligible_layers_and_reports_the_rest():
    """The refused layer's float paths are timed against each other: set timings (the dequantized-once path the
    faster), so the sentence does not hang on which of two float paths a busy machine times faster."""
    model = torch.nn.Sequential(_packed(16, 64, 8, 8, "tensor")[0], _packed(16, 16, 8, 8, "channel")[0])
    assert execution_path(model) == "simulated"
    report = to_integer_path(model, policy="integer", timer=fixed_timer(speeds()))
    assert report["integer"] == ["0"] and list(report["simulated"]) == ["1"]
    assert "per-input-channel" in report["simulated"]["1"]
    assert isinstance(model[0], IntegerLinear) and isinstance(model[1], PackedLinear)
    on = model[0].accumulator
    assert execution_path(model) == f"mixed: 1 on integer kernels ({on}), 1 float (weights dequantized once), of 2 Linears"
    to_integer_path(model, dynamic=True, policy="integer", timer=fixed_timer(speeds()))
    assert execution_path(model).startswith("integer kernels (")


def test_integer_w8a8_model_answers_like_the_simulated_one(bundled):
    import copy

    from qvlm.data import evaluation_subset
    from qvlm.models.inference import generate_answers
    from qvlm.quant import QuantConfig, quantize

    cfg = QuantConfig.from_bits("W8A8", recipe="rtn", preset="paper", act_granularity_language="tensor", calib_size=8,
                                calib_batch=4)  # static per-token vision ranges: integer kernels take them
    res = quantize(bundled, cfg)
    model = res.handle.model
    integer = copy.deepcopy(model)
    report = to_integer_path(integer, policy="integer")
    assert report["simulated"] == {} and len(report["integer"]) > 0
    assert execution_path(integer).startswith("integer kernels (") and execution_path(model) == "simulated"
    samples = evaluation_subset(6, seed=3)
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    assert generate_answers(integer, res.handle.processor, images, questions) == generate_answers(
        model, res.handle.processor, images, questions)


def test_a_rotated_layer_runs_on_integer_kernels_with_the_rotation_online():
    """vision_rotation: the simulated layer quantizes x R against Q(W R); the integer layer rotates x itself."""
    from qvlm.quant.vision_ranges import hadamard_matrix

    packed, x = _packed(16, 64, 4, 4, "tensor")
    packed.act.set_rotation(hadamard_matrix(64))
    assert refusal(packed) is None
    layer = IntegerLinear.from_packed(packed)
    with torch.no_grad():
        simulated, integer = packed(x), layer(x)
    torch.testing.assert_close(integer, simulated, rtol=1e-5, atol=1e-5)
