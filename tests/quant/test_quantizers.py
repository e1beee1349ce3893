"""Quantizer math: step/2 error bound, exactness on the grid, bit budgets, shapes, NF4, STE."""

from __future__ import annotations

import pytest
import torch

from qvlm.quant.quantizers import (
    ActQuantizer,
    encode_normal_float,
    encode_uniform,
    fake_quant,
    fake_quant_ste,
    lp_clip_search,
    lp_error,
    minmax_ranges,
    normal_float_levels,
    percentile_ranges,
    qparams,
    quantize_weight,
    quantize_weight_uniform,
)
from qvlm.quant.qlinear import QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_uniform_error_at_most_half_step_inside_grid(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = torch.tensor(-1.3), torch.tensor(2.1)
    scale, zp = qparams(lo, hi, bits)
    grid_lo, grid_hi = (0 - zp) * scale, ((1 << bits) - 1 - zp) * scale
    x = grid_lo + (grid_hi - grid_lo) * torch.rand(10000, generator=g)
    err = (fake_quant(x, scale, zp, bits) - x).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-6
    # the grid covers [lo, hi] up to half a step at either end
    assert float(grid_lo) <= -1.3 + float(scale) / 2 + 1e-6 and float(grid_hi) >= 2.1 - float(scale) / 2 - 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_exact_on_grid_points_and_clamps_outside(bits):
    lo, hi = torch.tensor(-0.7), torch.tensor(0.9)
    scale, zp = qparams(lo, hi, bits)
    codes = torch.arange(1 << bits, dtype=torch.float32)
    points = (codes - zp) * scale
    assert torch.allclose(fake_quant(points, scale, zp, bits), points, atol=1e-7)
    big = torch.tensor([100.0, -100.0])
    out = fake_quant(big, scale, zp, bits)
    assert float(out[0]) == pytest.approx(float(points.max()), abs=1e-6)
    assert float(out[1]) == pytest.approx(float(points.min()), abs=1e-6)


def test_zero_is_exactly_representable_even_for_one_sided_ranges():
    for lo, hi in [(0.5, 3.0), (-4.0, -1.0), (0.0, 1.0)]:
        scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), 4)
        assert float(fake_quant(torch.tensor(0.0), scale, zp, 4)) == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quant_respects_bits_per_output_channel(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    wq = quantize_weight_uniform(w, bits)
    assert wq.shape == w.shape
    for row in wq:
        assert row.unique().numel() <= 1 << bits
    # per output channel: each row's own range, so a row with tiny weights keeps resolution
    w2 = w.clone()
    w2[0] *= 1e-3
    wq2 = quantize_weight_uniform(w2, 4)
    assert float((wq2[0] - w2[0]).abs().max()) < 1e-3


def test_weight_quant_groups_have_their_own_ranges():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    w[:, :16] *= 100  # one group with large values, one with small
    per_channel = quantize_weight_uniform(w, 4)
    grouped = quantize_weight_uniform(w, 4, group_size=16)
    small = slice(16, 32)
    assert float((grouped[:, small] - w[:, small]).abs().mean()) < float((per_channel[:, small] - w[:, small]).abs().mean())
    for row in grouped:
        assert row[:16].unique().numel() <= 16 and row[16:].unique().numel() <= 16


@pytest.mark.parametrize("width", [4304, 100, 37])
def test_uniform_groups_fit_any_width_with_a_shorter_last_group_per_row(width):
    """SigLIP-so400m's fc2 reads 4304 features (67 groups of 64 and one of 16): each group, the short
    one included, gets its own range inside its row."""
    w = torch.randn(3, width, generator=torch.Generator().manual_seed(width))
    w[1, (width // 64) * 64:] *= 1e-3  # a tiny tail: only a range of its own keeps its resolution
    enc = encode_uniform(w, 4, 64)
    n_groups = -(-width // 64)
    assert enc.scale.shape == (3, n_groups) and enc.zero.shape == (3, n_groups)
    wq = enc.decode(torch.float32)
    assert wq.shape == w.shape
    for start in range(0, width, 64):
        block = wq[:, start:start + 64]
        step = enc.scale[:, start // 64].unsqueeze(1)
        assert bool(((block - w[:, start:start + 64]).abs() <= step / 2 + 1e-6).all())
    if width % 64:
        tail = slice((width // 64) * 64, width)
        assert float((wq[1, tail] - w[1, tail]).abs().max()) < 1e-3


def test_a_group_wider_than_the_layer_is_one_range_per_row():
    w = torch.randn(4, 48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(quantize_weight_uniform(w, 4, 128), quantize_weight_uniform(w, 4, None))


@pytest.mark.parametrize("bad", [0, -64, 7, 96, 8192, 64.0, True, "64"])
def test_bad_group_sizes_are_a_clear_error(bad):
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="group size .* power of two"):
        quantize_weight_uniform(w, 4, group_size=bad)
    with pytest.raises(ValueError, match="group size"):
        quantize_weight(w, 4, "nf4", bad)


def test_nf4_levels_are_bitsandbytes_table_exactly():
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(normal_float_levels(4), bnb.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(128, 256), (96, 1152), (8, 4304), (3, 100), (5, 7)])
def test_nf4_codes_and_absmax_equal_bitsandbytes_quantize_4bit(shape):
    """Blocks of 64 over the flattened weight, the last one shorter: bitsandbytes' layout, so a later
    switch to ``quantize_4bit`` keeps every code, absmax and dequantized float."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)  # high nibble first
    enc = encode_normal_float(w, 4, 64)
    assert torch.equal(enc.codes, nibbles[: w.numel()])
    assert torch.equal(enc.scale, state.absmax)
    if shape[1] % 2 == 0 and shape[1] % 64 == 0:
        # bitsandbytes 0.50.2's CPU dequantize kernel reads blocks per row, which only matches its own
        # flattened quantize_4bit when 64 divides the width; compare floats there.
        assert torch.equal(enc.decode(torch.float32), bnb.dequantize_4bit(packed, state))


def test_nf4_levels_match_bitsandbytes_table():
    expected = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379,
                0.4407, 0.5626, 0.7230, 1]
    assert torch.allclose(normal_float_levels(4), torch.tensor(expected), atol=1e-4)
    assert normal_float_levels(3).numel() == 8 and normal_float_levels(8).numel() == 256


def test_nf_weight_quant_uses_levels_times_block_absmax():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    wq = quantize_weight(w, 4, "nf4", 64)
    levels = normal_float_levels(4)
    blocks = w.reshape(8, 2, 64)
    absmax = blocks.abs().amax(-1, keepdim=True)
    codes = wq.reshape(8, 2, 64) / absmax
    dist = (codes.unsqueeze(-1) - levels).abs().min(-1).values
    assert float(dist.max()) < 1e-5
    # round to nearest level
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.allclose(codes, nearest, atol=1e-5)


def test_act_quantizer_shapes_per_granularity():
    x = torch.randn(3, 5, 7)
    for gran, g in [("channel", 7), ("token", 5), ("tensor", 1)]:
        q = ActQuantizer(4, gran)
        view = q.stat_view(x)
        assert view.shape[1] == g and view.numel() == x.numel()
        lo, hi = minmax_ranges(view)
        q.set_range(lo, hi)
        assert q.lo.shape == (g,)
        y = q(x)
        assert y.shape == x.shape
        scale = (q.hi - q.lo) / 15
        # inside [lo, hi] at most one step (half a step inside the integer-zero-point grid, which
        # may end up to half a step short of lo or hi)
        bound = scale.view(q.broadcast_shape(3, g)) + 1e-5
        assert bool(((y - x).abs() <= bound).all())
    # per-channel ranges broadcast over any number of tokens (decode: one token at a time)
    q = ActQuantizer(4, "channel")
    q.set_range(*minmax_ranges(q.stat_view(x)))
    assert q(torch.randn(2, 1, 7)).shape == (2, 1, 7)
    # per-token ranges need the calibrated sequence length
    qt = ActQuantizer(4, "token")
    qt.set_range(*minmax_ranges(qt.stat_view(x)))
    with pytest.raises(RuntimeError, match="token positions"):
        qt(torch.randn(1, 4, 7))


@pytest.mark.parametrize("granularity", ["channel", "token"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_answering_fake_quant_equals_torchs_op_bit_for_bit_ties_included(granularity, bits):
    """The fast no-gradient path must give exactly torch.fake_quantize_per_channel_affine's floats."""
    torch.manual_seed(bits)
    x = torch.randn(4, 9, 16) * 3
    q = ActQuantizer(bits, granularity)
    q.set_range(*minmax_ranges(q.stat_view(x)))
    scale, zero = q.grid()
    shape = q.broadcast_shape(3, scale.numel())
    ties = (torch.randint(-20, 20, x.shape).float() + 0.5 - zero.view(shape)) * scale.view(shape)  # k + 1/2 steps
    for inputs in (x, ties, x * 50):
        expected = torch.fake_quantize_per_channel_affine(inputs, q._scale, q._zp, q.axis(inputs), 0, 2**bits - 1)
        with torch.no_grad():
            assert torch.equal(q(inputs), expected)
    leaf = x.clone().requires_grad_(True)  # with a gradient the op itself runs (its mask is the backward)
    assert torch.equal(q(leaf).detach(), q(x))


def test_channel_view_drops_padding_tokens():
    x = torch.zeros(2, 3, 4)
    x[1, 2] = 1000.0  # a pad position with a huge value
    mask = torch.tensor([[True, True, True], [True, True, False]])
    q = ActQuantizer(4, "channel")
    lo, hi = minmax_ranges(q.stat_view(x, mask))
    assert float(hi.max()) == 0.0


def test_ste_gradients_reach_input_and_bounds():
    x = torch.linspace(-2, 2, 50, requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(1.0, requires_grad=True)
    y = fake_quant_ste(x, lo, hi, 3)
    assert torch.allclose(y.detach(), fake_quant(x.detach(), *qparams(lo.detach(), hi.detach(), 3), 3), atol=1e-6)
    y.pow(2).sum().backward()
    inside = (x.detach() > -0.9) & (x.detach() < 0.9)
    assert bool((x.grad[inside] != 0).any()) and bool((x.grad[x.detach().abs() > 1.5] == 0).all())
    assert lo.grad is not None and hi.grad is not None and float(hi.grad) != 0.0


def test_learnable_quantizer_round_trip():
    q = ActQuantizer(4, "token")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    # Every token spans zero (lo < 0 < hi): the log-magnitude parametrisation is then exact. A token
    # of one sign has lo = 0, which it clamps to -1e-3 * span, moving the grid slightly.
    x[..., 0] = -x[..., 0].abs() - 0.1
    x[..., 1] = x[..., 1].abs() + 0.1
    q.set_range(*minmax_ranges(q.stat_view(x)))
    before = q(x)
    params = q.make_learnable()
    assert len(params) == 2
    assert torch.allclose(q(x), before, atol=1e-5)
    q.freeze()
    assert q.log_hi is None and torch.allclose(q(x), before, atol=1e-5)


def test_lp_clip_search_never_worse_than_minmax_and_clips_outliers():
    g = torch.Generator().manual_seed(3)
    view = torch.randn(4000, 3, generator=g)
    view[0] = 40.0  # one outlier per channel
    lo, hi = minmax_ranges(view)
    base = lp_error(view, lo, hi, 4, 2.0)
    clo, chi, factor = lp_clip_search(view, 4, (1.0, 0.8, 0.6, 0.4), 2.0)
    assert lp_error(view, clo, chi, 4, 2.0) <= base
    assert factor < 1.0


def test_percentile_ranges_bracket_the_data():
    view = torch.arange(101, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    (lo1, hi1), (lo9, hi9) = percentile_ranges(view, (1.0, 0.9))
    assert float(lo1[0]) == 0.0 and float(hi1[0]) == 100.0
    assert float(lo9[0]) == pytest.approx(10.0) and float(hi9[0]) == pytest.approx(90.0)


def test_quant_linear_is_a_linear_with_quantized_weight_and_input():
    lin = torch.nn.Linear(8, 4)
    ref_w = lin.weight.detach().clone()
    q = QuantLinear.wrap(lin, ActQuantizer(8, "channel"))
    assert isinstance(q, torch.nn.Linear)
    x = torch.randn(2, 3, 8)
    q.act.set_range(*minmax_ranges(q.act.stat_view(x)))
    q.quantize_weight_(8, "uniform", None)
    assert q.weight.unique().numel() <= 4 * 256
    assert torch.allclose(q(x), torch.nn.functional.linear(x, ref_w, lin.bias), atol=0.05)
    with pytest.raises(RuntimeError):
        q.quantize_weight_(8, "uniform", None)
