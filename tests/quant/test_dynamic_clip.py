"""Clipped dynamic ranges (``act_dynamic_clip="lp"``): one factor per quantizer shrinks every token row's own
range; the init chooses it, VEO trains the vision tower's, and the integer kernels apply it."""

from __future__ import annotations

import pytest
import torch

from qvlm.quant import QuantConfig, quantize
from qvlm.quant.quantizers import ActQuantizer, dynamic_clip_search, dynamic_grid, fake_quant_dynamic


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 96, generator=g)
    x[:, 0] *= 12  # one outlier channel: what makes clipping worth a look
    return x


def test_a_clip_factor_shrinks_each_row_s_range_and_one_changes_nothing():
    rows = _rows()
    plain, ones = dynamic_grid(rows, 4), dynamic_grid(rows, 4, torch.tensor(1.0))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])
    assert torch.equal(fake_quant_dynamic(rows, 4), fake_quant_dynamic(rows, 4, torch.tensor(1.0)))
    step, _ = dynamic_grid(rows, 4, torch.tensor(0.5))
    assert torch.allclose(step, plain[0] * 0.5, rtol=1e-6)
    clipped = fake_quant_dynamic(rows, 4, torch.tensor(0.5))
    assert float(clipped.amax()) <= 0.5 * float(rows.amax()) + 1e-5  # the values beyond the shrunk range are clamped


def test_the_init_s_search_keeps_the_factor_with_the_smallest_lp_error():
    rows, grid = _rows(1), (1.0, 0.9, 0.8, 0.6, 0.4)
    errors = {c: float((fake_quant_dynamic(rows, 3, torch.tensor(c)) - rows).pow(2).mean()) for c in grid}
    assert dynamic_clip_search(rows, 3, grid, 2.0) == min(errors, key=errors.get)


def test_a_clip_factor_is_learnable_and_frozen_back():
    act = ActQuantizer(4, "dynamic_token")
    assert not act.trainable
    with pytest.raises(RuntimeError, match="nothing to learn"):
        act.make_learnable()
    act.set_clip(0.8)
    assert act.trainable and not act.calibrated
    (log_clip,) = act.make_learnable()
    x = _rows(2).requires_grad_(True)
    act(x).pow(2).sum().backward()
    assert log_clip.grad is not None and float(log_clip.grad.abs()) > 0
    with torch.no_grad():
        log_clip.add_(0.1)
    act.freeze()
    assert act.log_clip is None and float(act.clip) == pytest.approx(0.8 * float(torch.exp(torch.tensor(0.1))))
    with torch.no_grad():
        assert torch.equal(act(x), fake_quant_dynamic(x, 4, act.clip))
    with pytest.raises(RuntimeError, match="only a dynamic_token quantizer"):
        ActQuantizer(4, "tensor").set_clip(0.9)


def test_the_integer_preset_with_clipped_ranges_gives_veo_something_to_train(bundled):
    cfg = QuantConfig.from_bits("W4A4", recipe="qvlm", preset="integer", act_dynamic_clip="lp", calib_size=8,
                                calib_batch=4, veo_epochs=1, veo_holdout_images=0)
    result = quantize(bundled, cfg)
    assert result.init_notes.veo_skipped is None and len(result.veo_losses) == 2
    acts = [m for m in result.handle.model.modules() if isinstance(m, ActQuantizer)]
    assert acts and all(a.dynamic and a.clip is not None for a in acts)
    chosen = {v for k, v in result.init_notes.init.items() if k.startswith("vision.") and k.endswith(".clip")}
    assert chosen <= set(cfg.init_clip_grid)
    vision = [m.act for n, m in result.handle.model.named_modules() if getattr(m, "tower", "") == "vision"]
    assert any(float(a.clip) not in chosen for a in vision)  # VEO moved the vision factors off the init's grid
    without = quantize(bundled, cfg.replace(act_dynamic_clip="none"))
    assert without.init_notes.veo_skipped and not without.veo_losses
