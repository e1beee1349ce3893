"""What keeps a quantize run's memory bounded: the shared working copy, packing as layers finish,
and VEO's micro-batches (a 7B model's budget depends on all three; see benchmarks/README.md)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from qvlm.quant import QuantConfig, QuantLinear, quantize
from qvlm.quant.calibration import calibration_batches
from qvlm.quant.packing import PackedLinear
from qvlm.quant.recipes import configured_stages
from qvlm.quant.working_copy import shared_bytes, working_copy

FAST = dict(calib_size=8, calib_batch=4, veo_epochs=1, max_block_depth=2)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_working_copy_shares_linear_and_embedding_storage_only(bundled):
    fp = bundled.model
    copy = working_copy(fp)
    big = [p for m in fp.modules() if isinstance(m, (nn.Linear, nn.Embedding)) for p in m.parameters(recurse=False)]
    assert shared_bytes(fp, copy) == _bytes(big)
    assert _bytes(big) > 0.95 * _bytes(fp.parameters())
    fp_norm = fp.model.language_model.norm.weight
    copy_norm = copy.model.language_model.norm.weight
    assert copy_norm.data_ptr() != fp_norm.data_ptr() and torch.equal(copy_norm, fp_norm)
    # A new Parameter object: replacing its data (what quantizing does) leaves the FP model alone.
    fp_lin = fp.model.language_model.layers[0].mlp.down_proj
    copy_lin = copy.model.language_model.layers[0].mlp.down_proj
    before = fp_lin.weight.clone()
    copy_lin.weight.data = torch.zeros_like(copy_lin.weight)
    assert torch.equal(fp_lin.weight, before)


def _decoded_language_quantlinears() -> int:
    """Live QuantLinears of the decoder whose weight is quantized and still held decoded (full size)."""
    gc.collect()
    return sum(isinstance(o, QuantLinear) and o.tower == "language" and o.weight_quantized and o.weight.numel() > 0
               for o in gc.get_objects())


class _RecordLinearTypes:
    """A stage that records, after the init, the types of the decoder's Linears and the decoded leftovers."""

    name = "record"

    def __init__(self) -> None:
        self.types: list[type] = []
        self.decoded_alive: int | None = None

    def run(self, qrun) -> None:
        self.types = [type(lin) for e in qrun.qmap.language for lin in e.linears.values()]
        self.decoded_alive = _decoded_language_quantlinears()


def test_decoder_layers_are_packed_and_their_decoded_weights_freed_before_the_search(bundled):
    cfg = QuantConfig(recipe="qvlm-cdm", **FAST)
    alive_during_init: list[int] = []

    def progress(stage, fraction, message):
        if stage == "init" and message.startswith("language layer"):
            alive_during_init.append(_decoded_language_quantlinears())

    recorder = _RecordLinearTypes()
    quantize(bundled, cfg, progress=progress, stages=(configured_stages(cfg)[0], recorder))
    n_layers = len(bundled.layer_map.language)
    # all decoder Linears were packed before the next stage, and nothing holds their decoded weights
    assert len(recorder.types) == 7 * n_layers and set(recorder.types) == {PackedLinear}
    assert recorder.decoded_alive == 0
    # freed layer by layer, not at the end of the init
    assert alive_during_init == [0] * n_layers


def test_calib_batch_split_keeps_rows_in_order(bundled):
    (batch,) = calibration_batches(bundled, 4, 0, 4)
    parts = batch.split(3)
    assert [p.size for p in parts] == [3, 1]
    for name in ("input_ids", "attention_mask", "pixel_values", "answer_mask"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(batch, name))
    assert batch.split(4) == [batch]


def test_veo_micro_batches_accumulate_to_the_whole_batch_loss(bundled):
    logs = {}
    for micro in (None, 1):
        res = quantize(bundled, QuantConfig(recipe="qvlm-veo", veo_micro_batch=micro, **FAST))
        logs[micro] = res.veo_losses
    whole, micro = logs[None][0], logs[1][0]
    # Same data and start point; only the averaging of CE over answer tokens differs by row.
    for key in ("total", "reg", "err"):
        assert getattr(micro, key) == pytest.approx(getattr(whole, key), rel=0.05), key
    assert len(logs[1]) == len(logs[None])


def test_bad_micro_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="veo_micro_batch"):
        QuantConfig(veo_micro_batch=0).validate()


def test_veo_checkpointing_gives_the_same_losses_and_bounds(bundled):
    runs = {}
    for ckpt in (False, True):
        res = quantize(bundled, QuantConfig(recipe="qvlm-veo", veo_checkpoint=ckpt, **FAST))
        bounds = [m.act.hi.clone() for m in res.handle.model.modules()
                  if isinstance(m, PackedLinear) and m.tower == "vision"]
        runs[ckpt] = (res.veo_losses, bounds)
    (plain, b0), (ckpt, b1) = runs[False], runs[True]
    for a, b in zip(plain, ckpt):
        for key in ("total", "reg", "ent", "err"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5, abs=1e-7), key
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(b0, b1))
    # the layers' forward is restored afterwards
    assert all("forward" not in layer.__dict__ for layer in res.handle.model.model.language_model.layers)


def test_veo_keeps_the_epoch_with_the_lowest_held_out_error(bundled):
    res = quantize(bundled, QuantConfig(recipe="qvlm-veo", veo_holdout_images=8, **(FAST | {"veo_epochs": 2})))
    rows = res.veo_holdout
    assert [r.epoch for r in rows] == [0, 1, 2]
    kept = [r for r in rows if r.kept]
    assert len(kept) == 1 and kept[0].err == min(r.err for r in rows)
    assert all(r.err == pytest.approx(r.held_out.visual + res.config.veo_eta * r.held_out.output) for r in rows)
    # where the error ends: the answers, and VEO's ceiling (the same images, vision activations unquantized)
    held = [r.held_out for r in rows]
    assert all(0.0 <= h.answer_agree <= 1.0 and h.answer_kl >= 0.0 and h.answer_tokens >= 8 for h in held)
    ceiling = rows[0].vision_acts_fp
    assert ceiling.visual < held[0].visual and ceiling.answer_tokens == held[0].answer_tokens


def test_veo_that_only_hurts_held_out_images_leaves_the_init_ranges(bundled):
    """A learning rate far too high makes every epoch worse than the init: early stopping keeps the init."""
    def vision_ranges(res):
        return [m.act.get_range() for m in res.handle.model.modules()
                if isinstance(m, PackedLinear) and m.tower == "vision"]

    base = quantize(bundled, QuantConfig(recipe="qlora", **FAST))
    veo = quantize(bundled, QuantConfig(recipe="qvlm-veo", veo_lr=3.0, veo_holdout_images=8, **FAST))
    assert veo.veo_holdout[0].kept and veo.veo_holdout[1].err > veo.veo_holdout[0].err
    for (lo0, hi0), (lo1, hi1) in zip(vision_ranges(base), vision_ranges(veo)):
        assert torch.equal(lo0, lo1) and torch.equal(hi0, hi1)
