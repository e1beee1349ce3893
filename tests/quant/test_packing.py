"""Packed low-bit storage: exact round trips, real byte counts, identical dequantized weights."""

import pytest
import torch

from qvlm.quant.packing import PackedLinear, pack_bits, packed_weight_bytes, unpack_bits
from qvlm.quant.quantizers import (
    encode_normal_float,
    encode_uniform,
    encode_weight,
    nibbles_to_codes,
    quantize_weight,
    quantize_weight_uniform,
)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-1001 * bits // 8)  # ceil: no byte wasted beyond the last partial one
    assert torch.equal(unpack_bits(packed, bits, 1001), codes.to(torch.int32))


@pytest.mark.parametrize("bits,group", [(2, None), (3, 16), (4, None), (6, 32), (8, None)])
def test_uniform_codes_decode_to_the_fake_quantized_weight_exactly(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    enc = encode_uniform(w, bits, group)
    assert int(enc.codes.max()) < 2**bits
    assert torch.equal(enc.decode(torch.float32), quantize_weight_uniform(w, bits, group))


def test_normal_float_codes_decode_to_the_fake_quantized_weight_exactly():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    enc = encode_normal_float(w, 4, 64)
    assert torch.equal(enc.decode(torch.float32), quantize_weight(w, 4, "nf4", 64))


def test_packed_linear_matches_a_dense_layer_and_holds_fewer_bytes():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    enc = encode_uniform(dense.weight.data, 4, None)
    layer = PackedLinear.from_encoded(enc, dense.bias.data, act=None, smooth=None, dtype=torch.float32)
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(x, enc.decode(torch.float32), dense.bias)
    assert torch.equal(layer(x), expected)
    # 4-bit codes: 64*32/2 bytes, plus a float32 step and a uint8 zero point per output channel
    assert layer.storage_bytes() == 64 * 32 // 2 + 32 * 4 + 32
    assert layer.storage_bytes() < 64 * 32 * 2  # less than the FP16 weight


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_packed_stream_is_the_little_endian_bit_layout(bits):
    """Code i sits at stream bits i*bits..; exports written before the word-wise packer stay readable."""
    codes = torch.tensor([1, (1 << bits) - 1, 2, 0, 5 % (1 << bits)])
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    expected = torch.tensor([(stream >> (8 * j)) & 0xFF for j in range((codes.numel() * bits + 7) // 8)],
                            dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, bits), expected)


def test_packed_linear_backward_matches_the_dequantized_weight_without_saving_it():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    layer = PackedLinear.from_encoded(encode_uniform(w, 4), torch.randn(24), None, None, torch.float32)
    x = torch.randn(5, 32, requires_grad=True)
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(out, ref)
    # nothing is saved for backward (F.linear would save the decoded weight): only the packed layer
    assert out.grad_fn.saved_tensors == ()
    assert ref.grad_fn._saved_mat2.numel() == w.numel()  # F.linear keeps the decoded weight, for contrast
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)


@pytest.mark.parametrize("fmt,bits,group", [("uniform", 4, 64), ("uniform", 3, None), ("uniform", 6, 32),
                                            ("nf4", 4, 64), ("nf4", 3, None)])
@pytest.mark.parametrize("shape", [(16, 4304), (5, 1152), (3, 37)])
def test_any_width_packs_and_dequantizes_bit_exactly(fmt, bits, group, shape):
    """Widths that 64 does not divide (SigLIP-so400m's 4304, odd toy widths) pack, hold the bytes
    packed_weight_bytes predicts, and decode to the fake-quantized weight bit for bit."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    enc = encode_weight(w, bits, fmt, group)
    layer = PackedLinear.from_encoded(enc, None, None, None, torch.float32)
    assert torch.equal(layer.dequantized_weight(), enc.decode(torch.float32))
    assert layer.storage_bytes() == packed_weight_bytes(shape, bits, fmt, group)
    assert layer.w_format == fmt


NF4_SHAPES = [(16, 4304), (5, 1152), (3, 37), (512, 192), (7, 100), (2, 10)]


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_bitsandbytes_nf4_codes_equal_the_written_out_arithmetic(shape, block):
    """encode_normal_float takes its 4-bit codes from bitsandbytes.quantize_4bit: same codes, absmax, floats."""
    from qvlm.quant.quantizers import encode_nf4_bitsandbytes, encode_normal_float_blocks

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.05
    ours, bnb = encode_normal_float_blocks(w, 4, block), encode_nf4_bitsandbytes(w, block)
    assert torch.equal(bnb.codes, ours.codes)
    assert torch.equal(bnb.scale, ours.scale)
    assert bnb.group == ours.group
    assert torch.equal(bnb.decode(torch.float32), ours.decode(torch.float32))
    assert encode_normal_float(w, 4, block).codes.equal(bnb.codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_packed_nf4_layer_decodes_like_the_fake_quantizer_through_bitsandbytes_or_not(shape, block, dtype):
    """bitsandbytes' dequantize_4bit where its CPU kernel is right (block divides the width), ours elsewhere:
    the packed layer's weight is the fake quantizer's, bit for bit, and its stream is pack_bits' layout."""
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])).to(dtype)
    enc = encode_weight(w, 4, "nf4", block)
    layer = PackedLinear.from_encoded(enc, None, None, None, dtype)
    assert torch.equal(layer.dequantized_weight(), quantize_weight(w, 4, "nf4", block))
    assert torch.equal(layer.code_stream(), pack_bits(enc.codes, 4))
    packed, _ = quantize_4bit(w.float(), blocksize=block, quant_type="nf4")
    count = shape[0] * shape[1]  # bitsandbytes' bytes in memory (an odd count's spare nibble aside)
    assert torch.equal(nibbles_to_codes(layer.packed, count), nibbles_to_codes(packed, count))


def test_packed_nf4_decodes_right_where_the_block_does_not_divide_the_width():
    """Why the packed layer keeps its own decoder there: bitsandbytes 0.50.2's CPU kernel walks blocks within each
    row, so for widths the block does not divide (SigLIP's 4304 at 64) it decoded wrong floats on an AVX-512 CPU
    (2026-12-05); on an AVX2-only EPYC (2026-12-07) it decodes them right. Either way the layer must be right."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from qvlm.quant.quantizers import encode_weight

    w = torch.randn(16, 4304, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_right = torch.equal(dequantize_4bit(packed, state), quantize_weight(w, 4, "nf4", 64))
    layer = PackedLinear.from_encoded(encode_weight(w, 4, "nf4", 64), None, None, None, torch.float32)
    assert torch.equal(layer.dequantized_weight(), quantize_weight(w, 4, "nf4", 64)), f"bitsandbytes right here: {bnb_right}"
