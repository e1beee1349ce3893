"""DED analysis: does the entropy proxy predict cross-layer dependency? (paper Fig. 2, Fig. 5, App. A)

For a block of decoder layers starting at layer k (default: the pair k, k+1) and each calibration
sample on its own (paper §3.2 and Fig. 2: does the entropy predict what a joint search gains?):

    DED    = E_out(greedy layer-wise choice, Eq. 2) - E_out(joint choice, Eq. 3)  >= 0
    entropy = D(k_r, k_s) of Eqs. 4-6 for that sample (D(k, k+1) for a pair)
    qerr    = the block-output error at the layer-wise initialisation (the paper's alternative proxy)

E_out is the MSE of the block's last output against the FP model. Everything is measured at the
layer-wise initialisation (the state the CDM search starts from), rebuilt from the config's
recipe, so the analysis does not depend on which blocks CDM later formed. A least-squares line
and R^2 are fitted for entropy vs DED and for qerr vs DED.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvlm.models import VLMHandle
from qvlm.utils.progress import STAGE_DED, report
from qvlm.quant import QuantConfig, QuantRun, get_recipe
from qvlm.quant.calibration import mse_over, run_layer
from qvlm.quant.cdm import BlockObjective, CrossLayerDependencyMining, entropy_pass, unsearchable
from qvlm.quant.recipes import configure
from qvlm.quant.quantizers import valid_rows
from qvlm.quant.search import exhaustive_search
from qvlm.quant.records import VeoEpoch
from qvlm.utils.stats import LinearFit, finite, linear_fit, percent_change, r2_chance_level
from qvlm.utils.records import JsonRecord


@dataclass(frozen=True)
class DedPoint(JsonRecord):
    """One calibration sample of a block: its entropy D, its DED, and the errors DED is the difference of."""

    sample: int
    entropy: float
    ded: float
    qerr: float
    greedy_error: float
    joint_error: float


@dataclass(frozen=True)
class PairSummary(JsonRecord):
    """A block's numbers without its per-sample points: what the bench, the stored report and the UI show.

    The fields are :class:`DEDAnalysis`'s (see there); a stored report written before a field existed reads
    it as not measured (None), never as a made-up zero.
    """

    layer: int
    block: list[int]
    n: int
    r2_entropy: float
    r2_qerr: float
    r2_chance: float
    interaction_share: float | None = None
    mean_ded: float | None = None
    ded_relative: float | None = None
    controllable_share: float | None = None
    zero_ded_fraction: float | None = None
    joint_equals_greedy: bool = True
    gain: float | None = None
    branch_response: float | None = None

    @property
    def interacts(self) -> bool:
        return (self.interaction_share or 0.0) >= INTERACTION_THRESHOLD

    @property
    def above_chance(self) -> bool:
        """Whether entropy's R² against DED beats what noise reaches one time in twenty."""
        return self.r2_entropy > self.r2_chance



@dataclass(frozen=True)
class InteractionCounts:
    """How many adjacent pairs interact, pick a joint choice other than greedy, and fit DED above chance.

    Why one place: the verdict, the lead sentence and the measured table all state these counts.
    """

    pairs: int
    interacting: int
    differs: int
    above_chance: int

    @classmethod
    def of(cls, pairs: Sequence[PairSummary]) -> "InteractionCounts":
        return cls(len(pairs), sum(p.interacts for p in pairs), sum(not p.joint_equals_greedy for p in pairs),
                   sum(p.above_chance for p in pairs))


@dataclass
class DEDAnalysis:
    """DED per sample for one block, and the measures that say whether its layers interact.

    ``interaction_share``: two-way analysis of variance of the mean block error over the
    candidate grid (2-layer blocks): the share of its variance that an additive model
    mu + a[c_k] + b[c_k+1] leaves unexplained. 0 means the errors add up, so greedy = joint.
    ``controllable_error``: greedy block error minus the error with the block's own activation
    quantizers switched off (inputs and weights still quantized): the part a range choice can
    move at all. ``gain`` / ``branch_response`` of the block's first layer: how much of an
    incoming error its FP layer passes on / its own branch f(x) - x reacts to.
    """

    layer: int
    block: list[int]
    points: list[DedPoint] = field(default_factory=list)
    fit: LinearFit = field(default_factory=LinearFit)
    qerr_fit: LinearFit = field(default_factory=LinearFit)
    n_samples: int = 0
    r2_chance: float = 1.0
    interaction_share: float | None = None
    greedy_error: float = 0.0
    joint_error: float = 0.0
    controllable_error: float = 0.0
    block_error_unquantized_acts: float = 0.0
    zero_ded_fraction: float = 0.0
    joint_equals_greedy: bool = True
    gain: float | None = None
    branch_response: float | None = None

    @property
    def mean_ded(self) -> float:
        return sum(p.ded for p in self.points) / max(1, len(self.points))

    @property
    def ded_relative(self) -> float | None:
        """Mean DED as a share of the block's controllable error."""
        return self.mean_ded / self.controllable_error if self.controllable_error > 0 else None

    @property
    def controllable_share(self) -> float | None:
        return self.controllable_error / self.greedy_error if self.greedy_error > 0 else None

    def summary(self) -> PairSummary:
        """The numbers without the per-sample points (what the bench and the UI tables show)."""
        return PairSummary(
            layer=self.layer, block=self.block, n=self.n_samples, r2_entropy=self.fit.r2, r2_qerr=self.qerr_fit.r2,
            r2_chance=self.r2_chance, interaction_share=self.interaction_share, mean_ded=self.mean_ded,
            ded_relative=self.ded_relative, controllable_share=self.controllable_share,
            zero_ded_fraction=self.zero_ded_fraction, joint_equals_greedy=self.joint_equals_greedy, gain=self.gain,
            branch_response=self.branch_response)

    def to_dict(self) -> dict:
        return self.summary().to_dict() | {
            "points": [p.to_dict() for p in self.points], "fit": self.fit.to_dict(),
            "qerr_fit": self.qerr_fit.to_dict(), "n_samples": self.n_samples, "greedy_error": self.greedy_error,
            "joint_error": self.joint_error, "controllable_error": self.controllable_error}


def interaction_share(table: torch.Tensor) -> float:
    """Share of a 2-D error table's variance that the additive fit mu + a[i] + b[j] leaves (two-way ANOVA)."""
    t = table.double()
    mu = t.mean()
    additive = t.mean(dim=1, keepdim=True) + t.mean(dim=0, keepdim=True) - mu
    total = float(((t - mu) ** 2).sum())
    return float(((t - additive) ** 2).sum()) / total if total > 0 else 0.0


def _distance(a: list[torch.Tensor], b: list[torch.Tensor], masks) -> float:
    return float(sum(valid_rows(x.float() - y.float(), m).pow(2).sum() for x, y, m in zip(a, b, masks))) ** 0.5


def error_gain(fp_layer, inputs, xq: list[torch.Tensor], xr: list[torch.Tensor], cancel=None) -> tuple[float, float]:
    """(gain, branch response) of an FP layer fed the quantized-path input instead of the FP one.

    gain = ||f(x_q) - f(x_r)|| / ||x_q - x_r||; branch = the same for f(x) - x (the layer's own update).
    """
    fq, fr = run_layer(fp_layer, inputs, xq, cancel), run_layer(fp_layer, inputs, xr, cancel)
    d_in = _distance(xq, xr, inputs.masks)
    if d_in == 0:
        return 0.0, 0.0
    d_out = _distance(fq, fr, inputs.masks)
    d_branch = _distance([a - x for a, x in zip(fq, xq)], [b - x for b, x in zip(fr, xr)], inputs.masks)
    return d_out / d_in, d_branch / d_in


def _config_of(cfg_or_result) -> QuantConfig:
    cfg = getattr(cfg_or_result, "config", cfg_or_result)
    if not isinstance(cfg, QuantConfig):
        raise ValueError("ded_analysis needs a QuantConfig or a QuantResult")
    return cfg


def ded_sweep(handle_fp: VLMHandle, cfg_or_result, layers: list[int] | None = None, n_samples: int | None = None,
              depth: int = 2, progress=None, cancel=None) -> list[DEDAnalysis]:
    """DED analyses for blocks starting at each of ``layers`` (default: every layer that has ``depth`` layers)."""
    cfg = _config_of(cfg_or_result)
    if cfg.recipe == "fp":
        raise ValueError("DED analysis needs a quantizing recipe, not 'fp'")
    if reason := unsearchable(cfg):  # e.g. the deployable preset
        raise ValueError(f"DED analysis compares percentile ranges of the language layers' activations, and this "
                         f"variant has none ({reason}). Quantize with static ranges (another preset) to see the "
                         f"entropy-vs-DED view.")
    n_layers = len(handle_fp.layer_map.language)
    if depth < 2:
        raise ValueError("a DED block needs at least 2 layers")
    valid = list(range(0, n_layers - depth + 1))
    layers = valid if layers is None else list(layers)
    for k in layers:
        if k not in valid:
            raise ValueError(f"layer must be between 0 and {valid[-1]} for blocks of {depth} layers, got {k}")
    cfg = cfg.replace(calib_size=n_samples or cfg.calib_size, quantize_language=True)
    qrun = QuantRun(handle_fp, cfg, progress, cancel)
    qrun.prepare()
    configure(get_recipe(cfg.recipe).init, cfg).run(qrun)  # the state the CDM search starts from
    cdm = configure(CrossLayerDependencyMining(), cfg)  # the settings a CDM stage of this run searches with
    entries, fp_entries = qrun.qmap.language, handle_fp.layer_map.language
    inputs = qrun.language_inputs
    final_norm = handle_fp.layer_map.final_norm
    results = []
    with torch.no_grad():
        xq, xr = qrun.language_input(), inputs.hidden
        for k in range(max(layers) + 1):
            qrun.check_cancel()
            if k in layers:
                analysis = _analyse_block(entries, fp_entries, inputs, xq, xr, k, depth, cdm, cfg, final_norm,
                                          cancel)
                analysis.gain, analysis.branch_response = error_gain(fp_entries[k].module, inputs, xq, xr, cancel)
                results.append(analysis)
                report(progress, STAGE_DED, len(results) / len(layers), f"layer {k}")
            xq = run_layer(entries[k].module, inputs, xq, cancel)
            xr = run_layer(fp_entries[k].module, inputs, xr, cancel)
    qrun.release()
    return results


def _analyse_block(entries, fp_entries, inputs, xq, xr, k: int, depth: int, cdm: CrossLayerDependencyMining,
                   cfg: QuantConfig, final_norm, cancel) -> DEDAnalysis:
    block = list(range(k, k + depth))
    n_cands = len(cdm.percentiles) + 1  # the incumbent + the percentile grid, as the search sees them
    saved = {(b, role): lin.act.get_range() for b in block for role, lin in entries[b].linears.items()}
    ep = entropy_pass([entries[b] for b in block], [fp_entries[b] for b in block], inputs, xq, xr, cdm, cfg,
                      cancel)
    entropy = ep.per_sample.sum(dim=0)  # Eq. 6: D(k_r, k_s) = sum of the adjacent pairs
    score = BlockObjective(cdm.block_objective, entries, fp_entries, final_norm, inputs, cancel)
    refs, r = [], xr
    for b in block:
        r, ref = score.reference(b, r)
        refs.append(ref)

    def block_error() -> torch.Tensor:
        ys = xq
        for b in block:
            ys, compared = score.forward(b, ys)
        return mse_over(compared, refs[-1], inputs.masks)

    qerr = block_error()  # at the incumbent (layer-wise init) ranges
    acts = {(b, role): lin.act for b in block for role, lin in entries[b].linears.items()}
    for (b, role) in acts:
        entries[b].linears[role].act = None
    try:
        unquantized_acts = float(block_error().mean())
    finally:
        for (b, role), act in acts.items():
            entries[b].linears[role].act = act
    compared: dict[int, list[torch.Tensor]] = {}

    def apply(j: int, c: int) -> None:
        for role, lin in entries[block[j]].linears.items():
            lin.act.set_range(*ep.tables[j][role][c])

    def forward(j: int, zs):
        ys, compared[j] = score.forward(block[j], zs)
        return ys

    search = exhaustive_search(depth, n_cands, apply, forward,
                               lambda j, ys_: mse_over(compared[j], refs[j], inputs.masks), xq)
    greedy, _ = search.per_sample_greedy(depth, n_cands)
    joint = search.per_sample_joint(depth)
    ded = (greedy - joint).clamp_min(0)
    for (b, role), (lo, hi) in saved.items():
        entries[b].linears[role].act.set_range(lo, hi)
    share = None
    if depth == 2:
        table = torch.tensor([[float(search.prefix_errors[(i, j)].mean()) for j in range(n_cands)]
                              for i in range(n_cands)])
        share = interaction_share(table)
    points = [DedPoint(i, float(entropy[i]), float(ded[i]), float(qerr[i]), float(greedy[i]), float(joint[i]))
              for i in range(len(ded))]
    xs_e = [p.entropy for p in points]
    xs_q = [p.qerr for p in points]
    ys_d = [p.ded for p in points]
    return DEDAnalysis(layer=k, block=block, points=points, fit=linear_fit(xs_e, ys_d),
                       qerr_fit=linear_fit(xs_q, ys_d), n_samples=len(points), r2_chance=r2_chance_level(len(points)),
                       interaction_share=share, greedy_error=search.greedy_error, joint_error=search.error,
                       controllable_error=max(0.0, search.greedy_error - unquantized_acts),
                       block_error_unquantized_acts=unquantized_acts,
                       zero_ded_fraction=sum(p.ded <= 0.0 for p in points) / max(1, len(points)),
                       joint_equals_greedy=tuple(search.choice) == tuple(search.greedy_choice))


def ded_analysis(handle_fp: VLMHandle, cfg_or_result, layer: int = 0, n_samples: int | None = None,
                 depth: int = 2, progress=None, cancel=None) -> DEDAnalysis:
    """DED per calibration sample for the block of ``depth`` decoder layers starting at ``layer``."""
    return ded_sweep(handle_fp, cfg_or_result, [layer], n_samples, depth, progress, cancel)[0]


INTERACTION_THRESHOLD = 0.10
"""An adjacent pair "interacts" when the interaction term explains at least this share of its
block error's variance over the candidate grid (the gate of benchmarks/results/mosaic_designs.md,
"Interaction gate")."""


def dependency_verdict(pairs: Sequence[PairSummary]) -> str:
    """A plain-words verdict on whether the layers interact, derived from ``DEDAnalysis.summary()`` rows."""
    if not pairs:
        return "No decoder pairs were measured."
    shares = [p.interaction_share for p in pairs if p.interaction_share is not None]
    interacting = [p for p in pairs if p.interacts]
    counts = InteractionCounts.of(pairs)
    zero = sum(p.zero_ded_fraction or 0.0 for p in pairs) / len(pairs)
    n = len(pairs)
    share_text = (f"the interaction term explains {100 * min(shares):.1f}-{100 * max(shares):.1f}% of the block "
                  f"error's variance over the candidate grid" if shares else "no interaction share was measured")
    chance = (f"R² of entropy vs DED is above its 5% chance level in {counts.above_chance} of {n} pairs "
              f"(chance alone does that in about 1 pair in 20)")
    controllable = [p.controllable_share for p in interacting if p.controllable_share is not None]
    small = bool(controllable) and max(controllable) < 0.05
    widespread = counts.interacting >= max(1, math.ceil(n / 4))  # at least a quarter of the pairs
    if widespread and counts.differs and not small:
        return (f"On this model the layers interact: {share_text} (at least {100 * INTERACTION_THRESHOLD:.0f}% in "
                f"{counts.interacting} of {n} pairs), and the joint block search picks a different choice than "
                f"layer-by-layer search in {counts.differs} of {n} pairs, so block search has something to find. "
                f"{100 * zero:.0f}% of samples have DED = 0; {chance}.")
    if widespread and small:
        return (f"On this model the layers interact only where little can be gained: {share_text} (at least "
                f"{100 * INTERACTION_THRESHOLD:.0f}% in {counts.interacting} of {n} pairs), but in those pairs the "
                f"activation ranges control at most {100 * max(controllable):.1f}% of the block error (the rest "
                f"comes with the block's input and weights), and joint search differs from layer-by-layer search in "
                f"{counts.differs} of {n} pairs. {100 * zero:.0f}% of samples have DED = 0; {chance}.")
    return (f"On this model the layers' quantization errors add up: {share_text} (at least "
            f"{100 * INTERACTION_THRESHOLD:.0f}% in only {counts.interacting} of {n} pairs), so the best range of one "
            f"layer hardly depends on its neighbour's and joint block search picks the layer-by-layer choice in "
            f"{n - counts.differs} of {n} pairs: it cannot beat layer-by-layer search here. {100 * zero:.0f}% of "
            f"samples have DED = 0; {chance}, so entropy has little DED to explain.")


VEO_SHARE_NEGLIGIBLE = 0.10
"""Below this share of the answers' divergence from FP caused by the vision activations'
quantization, their error does not reach the answers enough for VEO to matter."""


@dataclass(frozen=True)
class VeoOutcome:
    """What VEO did on held-out images, from :attr:`QuantResult.veo_holdout` (epoch 0 = the layer-wise init).

    ``error_*`` are Eq. 9's held-out error L_err (visual + eta * LLM output), the quantity VEO keeps
    its best epoch by; ``kl_*`` the mean KL(FP ‖ quantized) per answer token, in nats, where measured.
    """

    error_before: float
    error_after: float
    kept_epoch: int
    epochs: int
    kl_before: float | None = None
    kl_after: float | None = None
    kl_unquantized: float | None = None
    """The answers' KL with the vision activations unquantized: as close to FP as VEO could bring them."""

    @property
    def error_change(self) -> float:
        return percent_change(self.error_before, self.error_after)

    @property
    def error_phrase(self) -> str:
        """"0.0953 → 0.0912 (-4%)": the one spelling of the held-out error change, for the title and the text."""
        return f"{self.error_before:.3g} → {self.error_after:.3g} ({self.error_change:+.0f}%)"

    @property
    def vision_share(self) -> float | None:
        """The share of the answers' divergence from FP that quantizing the vision activations causes."""
        if self.kl_before is None or self.kl_unquantized is None or self.kl_before <= 0:
            return None
        return (self.kl_before - self.kl_unquantized) / self.kl_before


def veo_outcome(holdout: Sequence[VeoEpoch] | None) -> VeoOutcome | None:
    """The held-out numbers of a VEO run, or None when it measured no held-out images."""
    rows = [r for r in (holdout or []) if finite(r.err)]
    if not rows:
        return None
    first, kept = rows[0], next((r for r in rows if r.kept), rows[-1])
    ceiling = first.vision_acts_fp
    kl = (first.answer_kl, kept.answer_kl, ceiling.answer_kl if ceiling else None)
    if not all(finite(k) for k in kl):
        kl = (None, None, None)
    return VeoOutcome(first.err, kept.err, kept.epoch, rows[-1].epoch, *kl)


@dataclass
class DependencyReport:
    """Per adjacent decoder pair: DED, interaction share, controllable error, gain; and the verdict."""

    pairs: list[DEDAnalysis]
    verdict: str

    @property
    def summaries(self) -> list[PairSummary]:
        return [p.summary() for p in self.pairs]

    def to_dict(self) -> dict:
        return {"pairs": [p.to_dict() for p in self.summaries], "verdict": self.verdict}


@dataclass(frozen=True)
class StoredDependencyReport:
    """One bit setting's report as a model folder stores it: the pairs, the verdict, how it was measured."""

    pairs: list[PairSummary]
    verdict: str
    samples: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    """The rest of what was stored with it (model, task, recipe, seconds)."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoredDependencyReport":
        facts = {k: v for k, v in d.items() if k not in ("pairs", "verdict", "samples")}
        return cls([PairSummary.from_dict(p) for p in d["pairs"]], str(d["verdict"]), d.get("samples"), facts)


DEPENDENCY_REPORT = "dependency_report.json"
"""A model folder's stored diagnostics (``python -m qvlm diagnose``): {bits: {"pairs", "verdict", ...}}."""


def store_dependency_report(path: str | Path, bits: str, report: DependencyReport, **facts) -> dict:
    """Merge one bit setting's report (and ``facts``: model, samples, seconds, ...) into ``path``; returns all.

    Why stored: the diagnostics take minutes per model, and the Analysis tab shows the measured
    verdict of every bundled model side by side before anyone runs them again.
    """
    path = Path(path)
    stored = _stored_reports(path)
    stored[bits] = {**facts, **report.to_dict()}
    path.write_text(json.dumps(stored, indent=1, default=str))
    return stored


def _stored_reports(path: Path) -> dict[str, dict]:
    """The raw JSON of ``path`` by bit setting; {} when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_dependency_reports(path: str | Path) -> dict[str, StoredDependencyReport]:
    """The stored reports of ``path`` by bit setting; {} when absent or unreadable, a malformed entry left out."""
    reports = {}
    for bits, d in _stored_reports(Path(path)).items():
        try:
            reports[bits] = StoredDependencyReport.from_dict(d)
        except (KeyError, TypeError, ValueError):
            continue
    return reports


def dependency_diagnostics(handle_fp: VLMHandle, cfg_or_result, n_samples: int | None = None,
                           progress=None, cancel=None) -> DependencyReport:
    """Whether the model's decoder layers interact under quantization: every adjacent pair, one sweep."""
    pairs = ded_sweep(handle_fp, cfg_or_result, None, n_samples, 2, progress, cancel)
    return DependencyReport(pairs, dependency_verdict([p.summary() for p in pairs]))
