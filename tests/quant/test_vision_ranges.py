"""The three vision-range options: dynamic per-token ranges, the RepQ-ViT fold of per-channel ranges, and
one rotation before the vision Linears (qvlm/quant/vision_ranges.py, ActQuantizer's "dynamic_token")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvlm.data import get_task
from qvlm.export.checkpoints import export_refusal, load_quantized, save_quantized
from qvlm.models.inference import generate_answers
from qvlm.quant import QuantConfig
from qvlm.quant.calibration import per_sample_mse
from qvlm.quant.integer import IntegerLinear
from qvlm.quant.packing import PackedLinear
from qvlm.quant.pipeline import quantize
from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import ActQuantizer, act_codes, dynamic_grid, encode_weight, fake_quant_dynamic
from qvlm.quant.vision_ranges import (
    LinearFold,
    apply_linear_fold,
    fold_layernorm,
    fold_shift,
    hadamard_matrix,
    random_orthogonal,
    rotate_inputs,
    tensor_grid,
)

FAST = dict(calib_size=4, calib_batch=4, veo_epochs=1, veo_holdout_images=0)


def _cfg(**overrides) -> QuantConfig:
    return QuantConfig.from_bits("W4A4", recipe=overrides.pop("recipe", "qlora"), **(FAST | overrides))


@pytest.fixture(scope="module")
def questions():
    samples = get_task("easy-vqa").evaluation_subset(4)
    return [s.load_image() for s in samples], [s.question for s in samples]


def _answers(handle, questions) -> list[str]:
    images, texts = questions
    return generate_answers(handle.model, handle.processor, images, texts)


def _final_hidden(model, batches) -> list[torch.Tensor]:
    from qvlm.models import core_model

    with torch.no_grad():
        return [core_model(model)(**b.model_inputs(), use_cache=False).last_hidden_state for b in batches]


def _output_mse(bundled, model) -> float:
    from qvlm.quant.calibration import calibration_batches

    batches = calibration_batches(bundled, 8, 7, 4)
    ref, out = _final_hidden(bundled.model, batches), _final_hidden(model, batches)
    return float(torch.cat([per_sample_mse(o, r, b.valid) for o, r, b in zip(out, ref, batches)]).mean())


# ---------------------------------------------------------------------------------------------- dynamic
def test_dynamic_quantizer_rounds_like_the_integer_path():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 48) * torch.linspace(0.1, 5.0, 48)
    act = ActQuantizer(4, "dynamic_token")
    assert not act.calibrated and act.dynamic
    rows = x.reshape(-1, 48)
    scale, zero = dynamic_grid(rows, 4)
    codes = act_codes(rows, scale.unsqueeze(1), zero.unsqueeze(1), 4)
    assert torch.equal(act(x), ((codes - zero.unsqueeze(1)) * scale.unsqueeze(1)).reshape(x.shape))
    with pytest.raises(RuntimeError, match="nothing to learn"):
        act.make_learnable()


def test_dynamic_quantizer_passes_gradients_through_with_the_same_values():
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = fake_quant_dynamic(x, 4)
    assert torch.equal(y.detach(), fake_quant_dynamic(x.detach(), 4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_packed_dynamic_layer_matches_integer_linear_codes():
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    q = QuantLinear.wrap(lin, ActQuantizer(8, "dynamic_token"))
    q.quantize_weight_(8, "uniform", None)
    packed = PackedLinear.from_encoded(q.encoded, q.bias, q.act, None, torch.float32)
    integer = IntegerLinear.from_packed(packed, dynamic=True)
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        assert torch.allclose(packed(x), integer(x), atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def dynamic_run(bundled):
    return quantize(bundled, _cfg(recipe="qvlm", act_granularity_vision="dynamic_token",
                                  act_granularity_language="dynamic_token"))


def test_dynamic_token_runs_answers_and_skips_veo_and_cdm(dynamic_run, questions):
    notes = dynamic_run.init_notes
    assert "no bounds to train" in notes.veo_skipped and dynamic_run.veo_losses == []
    assert "percentile" in notes.cdm_skipped
    acts = [m.act for m in dynamic_run.handle.model.modules() if isinstance(m, PackedLinear)
            and m.tower in ("vision", "language")]
    assert acts and all(a.dynamic and not a.calibrated for a in acts)
    answers = _answers(dynamic_run.handle, questions)
    assert len(answers) == 4 and all(answers)


def test_dynamic_token_export_round_trips(dynamic_run, tmp_path, questions):
    folder = save_quantized(dynamic_run.handle, tmp_path / "dyn", dynamic_run.config.to_dict())
    loaded = load_quantized(folder, device="cpu")
    assert _answers(loaded, questions) == _answers(dynamic_run.handle, questions)


# ---------------------------------------------------------------------------------------------- fold
def test_fold_keeps_the_codes_and_the_output_of_a_layernorm_linear_pair():
    torch.manual_seed(2)
    c = 24
    ln = nn.LayerNorm(c).double()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(c, dtype=torch.float64) * 4 + 0.1)
        ln.bias.copy_(torch.randn(c, dtype=torch.float64))
    lin = nn.Linear(c, 16).double()
    x = torch.randn(50, c, dtype=torch.float64) * 3
    act = ActQuantizer(4, "channel")
    h = ln(x).detach()
    act.set_range(h.amin(0) * 0.9, h.amax(0) * 0.9)
    s_c, z_c = (t.double() for t in act.grid())
    codes = torch.clamp(torch.round(h / s_c) + z_c, 0, 15)
    y = lin((codes - z_c) * s_c)

    target = tensor_grid(act)
    r, sk = fold_shift(act, target)
    fold_layernorm(ln, r, sk * r)
    w_folded, b_folded = lin.weight.detach() * r, lin.bias.detach() + (lin.weight.detach() * r) @ sk
    s, z = (t.double() for t in target.grid())
    codes_folded = torch.clamp(torch.round(ln(x).detach() / s) + z, 0, 15)
    assert torch.equal(codes_folded, codes)
    y_folded = (codes_folded - z) * s @ w_folded.T + b_folded
    assert torch.allclose(y_folded, y, atol=1e-10)


def test_fold_requantizes_a_quantized_linear_consistently():
    torch.manual_seed(3)
    lin = nn.Linear(32, 8)
    fp_w, fp_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    q = QuantLinear.wrap(lin, ActQuantizer(4, "channel"))
    q.quantize_weight_(4, "uniform", None)
    x = torch.randn(20, 32) * torch.linspace(0.2, 3.0, 32)
    q.act.set_range(x.amin(0), x.amax(0))
    target = tensor_grid(q.act)
    r, sk = fold_shift(q.act, target)
    apply_linear_fold(q, fp_w, fp_b, LinearFold(r_in=r, sk_in=sk, act=target))
    assert q.act is target and torch.equal(q.weight.data, encode_weight((fp_w.double() * r).float(), 4, "uniform", None).decode(torch.float32))


@pytest.fixture(scope="module")
def channel_runs(bundled):
    return {fold: quantize(bundled, _cfg(act_granularity_vision="channel", vision_fold_ranges=fold,
                                 vision_rotation="none"))
            for fold in (False, True)}


def test_fold_runs_on_the_bundled_model_and_lists_its_sites(channel_runs, bundled, questions):
    res = channel_runs[True]
    fold = res.init_notes.vision_fold
    n = len(bundled.layer_map.vision)
    assert sorted(fold["folded"]) == sorted([f"vision.{i}.q/k/v" for i in range(n)]
                                            + [f"vision.{i}.fc1" for i in range(n)]
                                            + [f"vision.{i}.o" for i in range(n)])
    assert sorted(fold["unfolded"]) == [f"vision.{i}.fc2" for i in range(n)]
    grans = {m.role: m.act.granularity for m in res.handle.model.modules()
             if isinstance(m, PackedLinear) and m.tower == "vision"}
    assert grans == {"q": "tensor", "k": "tensor", "v": "tensor", "o": "tensor", "fc1": "tensor", "fc2": "channel"}
    answers = _answers(res.handle, questions)
    assert len(answers) == 4 and all(answers)


def test_fold_leaves_the_final_output_error_nearly_unchanged(channel_runs, bundled):
    plain, folded = (_output_mse(bundled, channel_runs[f].handle.model) for f in (False, True))
    assert abs(folded - plain) <= 0.05 * plain, (plain, folded)


def test_fold_after_veo_leaves_diverged_qkv_ranges_unfolded(bundled):
    res = quantize(bundled, _cfg(recipe="qvlm-veo", vision_fold_ranges=True, vision_rotation="none"))
    fold = res.init_notes.vision_fold
    assert all(f"vision.{i}.fc1" in fold["folded"] for i in range(len(bundled.layer_map.vision)))
    assert all("different ranges" in why for site, why in fold["unfolded"].items() if site.endswith("q/k/v"))


def test_fold_needs_channel_ranges_and_no_rotation():
    with pytest.raises(ValueError, match="act_granularity_vision='channel'"):
        _cfg(act_granularity_vision="token", vision_fold_ranges=True, vision_rotation="none")
    with pytest.raises(ValueError, match="cannot be combined"):
        _cfg(vision_fold_ranges=True, vision_rotation="orthogonal")


# ---------------------------------------------------------------------------------------------- rotation
@pytest.mark.parametrize("n", [1, 2, 16, 12, 192, 768, 1024, 20])
def test_hadamard_rotations_are_orthogonal(n):
    h = hadamard_matrix(n).double()
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(h.abs() * n ** 0.5, torch.ones(n, n, dtype=torch.float64), atol=1e-5)


def test_hadamard_refuses_a_width_it_cannot_build():
    with pytest.raises(ValueError, match="vision_rotation='orthogonal'"):
        hadamard_matrix(4304)


def test_random_orthogonal_is_seeded_and_orthogonal():
    q = random_orthogonal(48, 0)
    assert torch.equal(q, random_orthogonal(48, 0)) and not torch.equal(q, random_orthogonal(48, 1))
    assert torch.allclose(q.double() @ q.double().T, torch.eye(48, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_rotation_runs_on_the_bundled_model_and_answers(bundled, questions, rotation, tmp_path):
    res = quantize(bundled, _cfg(act_granularity_vision="dynamic_token", vision_rotation=rotation))
    vision = [m for m in res.handle.model.modules() if isinstance(m, PackedLinear) and m.tower == "vision"]
    assert vision and all(m.act.rotation is not None for m in vision)
    answers = _answers(res.handle, questions)
    assert len(answers) == 4 and all(answers)
    assert "rotation" not in (export_refusal(res.config, "compressed-tensors") or "")  # written un-rotated
    loaded = load_quantized(save_quantized(res.handle, tmp_path / rotation, res.config.to_dict()), device="cpu")
    assert _answers(loaded, questions) == answers


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_rotated_linear_computes_the_same_function_before_quantizing(rotation):
    torch.manual_seed(4)
    lin = nn.Linear(192, 40)
    x = torch.randn(3, 9, 192)
    with torch.no_grad():
        y = lin(x)
        q = QuantLinear.wrap(lin, ActQuantizer(4, "token"))
        rotate_inputs([q], rotation, seed=0)
        assert torch.allclose(q(x), y, atol=1e-5)


def test_awq_runs_with_the_default_rotation_and_leaves_rotated_inputs_unsmoothed(bundled):
    """The recommended preset rotates the vision inputs; AWQ's smoothing then applies to the LLM only."""
    res = quantize(bundled, _cfg(recipe="awq"))
    vision = [lin for entry in res.handle.layer_map.vision for lin in entry.linears.values()]
    language = [lin for entry in res.handle.layer_map.language for lin in entry.linears.values()]
    assert all(lin.act.rotation is not None and lin.smooth is None for lin in vision)
    assert any(lin.smooth is not None for lin in language)
