"""CDM's guarantees on the bundled model: the incumbent is a candidate, and the final-output check."""

from __future__ import annotations

import pytest

from qvlm.quant import QuantConfig, quantize

FAST = dict(calib_size=8, calib_batch=4, max_block_depth=2)


@pytest.mark.parametrize("objective", ["normed_hidden", "linear_output", "residual"])
def test_every_block_objective_ends_no_worse_than_the_incumbent(bundled, objective):
    res = quantize(bundled, QuantConfig(recipe="qvlm-cdm", block_objective=objective, **FAST))
    assert res.search and all(s.objective == objective for s in res.search)
    assert all(s.error <= s.incumbent_error + 1e-12 for s in res.search)


def test_the_final_output_check_puts_rejected_blocks_back_at_their_incumbent(bundled):
    res = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="final_output", **FAST))
    for s in res.search:
        assert isinstance(s.accepted, bool)
        if not s.accepted:
            assert all(res.percentiles[k] is None for k in s.block)  # None: the init's ranges
    blockwise = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="block", **FAST))
    assert all(s.accepted for s in blockwise.search)


def test_the_holdout_check_keeps_only_choices_that_also_help_unseen_pairs(bundled):
    res = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="holdout", cdm_holdout_images=8, **FAST))
    changed = [s for s in res.search if s.accept_errors]
    assert changed, "no block changed its ranges: the check was never exercised"
    for s in changed:
        chosen, incumbent = s.accept_errors["calibration"]
        if s.accepted:
            assert chosen < incumbent and s.accept_errors["holdout"][0] < s.accept_errors["holdout"][1]
        else:
            assert all(res.percentiles[k] is None for k in s.block)
            rejected_by_holdout = chosen < incumbent
            assert not rejected_by_holdout or s.accept_errors["holdout"][0] >= s.accept_errors["holdout"][1]


def test_without_holdout_pairs_the_check_falls_back_to_the_calibration_pairs(bundled):
    with_check = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="holdout", cdm_holdout_images=0, **FAST))
    calibration_only = quantize(bundled, QuantConfig(recipe="qvlm-cdm", cdm_accept="final_output", **FAST))
    assert with_check.percentiles == calibration_only.percentiles
    assert all("holdout" not in s.accept_errors for s in with_check.search)


def test_the_answer_kl_score_is_zero_on_the_fp_output_and_grows_with_a_perturbation():
    import torch

    from qvlm.quant.acceptance import output_score
    from qvlm.quant.calibration import CalibBatch

    torch.manual_seed(0)
    answer = torch.tensor([[False, False, False, True, True, False]])
    batch = CalibBatch(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, 4, 4),
                       answer, None)
    head = torch.nn.Linear(8, 11)
    fp = [torch.randn(1, 6, 8)]
    score = output_score("answer_kl", fp, [batch], [None], head)
    assert score(fp) == pytest.approx(0.0, abs=1e-7)
    near, far = [fp[0] + 0.01 * torch.randn(1, 6, 8)], [fp[0] + 1.0 * torch.randn(1, 6, 8)]
    assert 0.0 < score(near) < score(far)
    moved_elsewhere = [fp[0].clone()]
    moved_elsewhere[0][0, 0] += 5.0  # position 0 predicts no answer token: the score does not see it
    assert score(moved_elsewhere) == pytest.approx(0.0, abs=1e-7)


def test_the_check_remembers_the_model_s_output_error_instead_of_rerunning_the_incumbent(bundled, monkeypatch):
    """Each decision's incumbent is the model as the previous decision left it: remembered, it gives the
    same decisions and errors as re-running the rest of the model, with fewer rest-of-model passes."""
    import qvlm.quant.cdm as cdm
    from qvlm.quant.acceptance import OutputCheck

    made: list[list[OutputCheck]] = []

    def recording(qrun, xq0, *settings):
        made.append(cdm_checks(qrun, xq0, *settings))
        return made[-1]

    cdm_checks = cdm.acceptance_checks
    monkeypatch.setattr(cdm, "acceptance_checks", recording)
    cfg = QuantConfig(recipe="qvlm-cdm", cdm_accept="holdout", cdm_holdout_images=8, **FAST)
    remembered = quantize(bundled, cfg)
    monkeypatch.setattr(OutputCheck, "incumbent_error", lambda self, rest, out: self.final_error(rest, out))
    rerun = quantize(bundled, cfg)
    assert remembered.percentiles == rerun.percentiles
    decided = [(a, b) for a, b in zip(remembered.search, rerun.search) if a.accept_errors]
    assert len(decided) >= 2, "fewer than two decisions: nothing to remember between them"
    for a, b in decided:
        assert a.accepted == b.accepted and a.accept_errors.keys() == b.accept_errors.keys()
        for name, (chosen, incumbent) in a.accept_errors.items():
            assert chosen == pytest.approx(b.accept_errors[name][0], rel=1e-5)
            assert incumbent == pytest.approx(b.accept_errors[name][1], rel=1e-5)
    assert sum(c.rest_runs for c in made[0]) < sum(c.rest_runs for c in made[1])
    assert 0 < remembered.timing_details["search_acceptance"] <= remembered.timings["search"]  # the check's share


class _Check:
    """An OutputCheck whose errors are set by the test: the block's output is the candidates applied so far."""

    def __init__(self, name: str, chosen: float, incumbent: float, applied: list) -> None:
        self.name, self.errors, self.applied = name, {"chosen": chosen, "incumbent": incumbent}, applied
        self.xs, self.current_error = "input", None

    def block_output(self, layers):
        return tuple(self.applied[-len(layers):])

    def final_error(self, rest, block_out):
        return self.errors["incumbent" if all(c == 0 for _, c in block_out) else "chosen"]

    def incumbent_error(self, rest, incumbent_out):  # remembered, as OutputCheck remembers the model as it stands
        if self.current_error is None:
            self.current_error = self.final_error(rest, incumbent_out)
        return self.current_error


@pytest.mark.parametrize("chosen, kept", [(0.5, True), (1.0, False), (2.0, False)])
def test_decide_block_keeps_a_choice_only_if_it_lowers_the_output_error(chosen, kept):
    """Forced both ways (the run-level tests above only see what a run happens to reject): a choice that does not
    lower the error is put back at the incumbent (candidate 0 of every layer), and the check follows that state."""
    from types import SimpleNamespace

    from qvlm.quant.acceptance import decide_block

    applied: list[tuple[int, int]] = []
    entries = [SimpleNamespace(module=f"layer{k}") for k in range(3)]
    check = _Check("calibration", chosen, 1.0, applied)
    decision = decide_block(entries, [0, 1], (2, 1), lambda j, c: applied.append((j, c)), [check])
    assert decision.accepted is kept and decision.errors["calibration"] == [chosen, 1.0]
    assert applied[-2:] == ([(0, 2), (1, 1)] if kept else [(0, 0), (1, 0)])  # where the block is left
    assert check.xs == (tuple(applied[-2:]))
    assert check.current_error == (chosen if kept else 1.0)
