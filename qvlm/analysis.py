"""DED analysis: does the entropy proxy predict cross-layer dependency? (paper Fig. 2, Fig. 5, App. A)

For a block of decoder layers starting at layer k (default: the pair k, k+1) and each calibration
sample on its own (design note §3):

    DED    = E_out(greedy layer-wise choice, Eq. 2) - E_out(joint choice, Eq. 3)  >= 0
    entropy = D(k_r, k_s) of Eqs. 4-6 for that sample (D(k, k+1) for a pair)
    qerr    = the block-output error at the layer-wise initialisation (the paper's alternative proxy)

E_out is the MSE of the block's last output against the FP model. Everything is measured at the
layer-wise initialisation (the state the CDM search starts from), rebuilt from the config's
recipe, so the analysis does not depend on which blocks CDM later formed. A least-squares line
and R^2 are fitted for entropy vs DED and for qerr vs DED.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qvlm.models import VLMHandle
from qvlm.progress import STAGE_DED, report
from qvlm.quant import QuantConfig, QuantRun, get_recipe
from qvlm.quant.calibration import mse_over, run_layer
from qvlm.quant.cdm import entropy_pass
from qvlm.quant.search import exhaustive_search
from qvlm.stats import linear_fit


@dataclass
class DEDAnalysis:
    layer: int
    block: list[int]
    points: list[dict] = field(default_factory=list)
    fit: dict = field(default_factory=dict)
    qerr_fit: dict = field(default_factory=dict)
    n_samples: int = 0

    def to_dict(self) -> dict:
        return {"layer": self.layer, "block": self.block, "points": self.points, "fit": self.fit,
                "qerr_fit": self.qerr_fit, "n_samples": self.n_samples}


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
    get_recipe(cfg.recipe).init.run(qrun)  # the state the CDM search starts from
    entries, fp_entries = qrun.qmap.language, handle_fp.layer_map.language
    inputs = qrun.language_inputs
    results = []
    with torch.no_grad():
        xq, xr = qrun.language_input(), inputs.hidden
        for k in range(max(layers) + 1):
            qrun.check_cancel()
            if k in layers:
                results.append(_analyse_block(entries, fp_entries, inputs, xq, xr, k, depth, cfg, cancel))
                report(progress, STAGE_DED, len(results) / len(layers), f"layer {k}")
            xq = run_layer(entries[k].module, inputs, xq, cancel)
            xr = run_layer(fp_entries[k].module, inputs, xr, cancel)
    qrun.release()
    return results


def _analyse_block(entries, fp_entries, inputs, xq, xr, k: int, depth: int, cfg: QuantConfig,
                   cancel) -> DEDAnalysis:
    block = list(range(k, k + depth))
    n_cands = len(cfg.percentiles) + 1  # the incumbent + the percentile grid, as the search sees them
    saved = {(b, role): lin.act.get_range() for b in block for role, lin in entries[b].linears.items()}
    ep = entropy_pass([entries[b] for b in block], [fp_entries[b] for b in block], inputs, xq, xr, cfg, cancel)
    entropy = ep.per_sample.sum(dim=0)  # Eq. 6: D(k_r, k_s) = sum of the adjacent pairs
    refs, r = [], xr
    for b in block:
        r = run_layer(fp_entries[b].module, inputs, r, cancel)
        refs.append(r)
    ys = xq
    for b in block:
        ys = run_layer(entries[b].module, inputs, ys, cancel)
    qerr = mse_over(ys, refs[-1], inputs.masks)

    def apply(j: int, c: int) -> None:
        for role, lin in entries[block[j]].linears.items():
            lin.act.set_range(*ep.tables[j][role][c])

    search = exhaustive_search(
        depth, n_cands, apply,
        lambda j, zs: run_layer(entries[block[j]].module, inputs, zs, cancel),
        lambda j, ys_: mse_over(ys_, refs[j], inputs.masks), xq)
    greedy, _ = search.per_sample_greedy(depth, n_cands)
    joint = search.per_sample_joint(depth)
    ded = (greedy - joint).clamp_min(0)
    for (b, role), (lo, hi) in saved.items():
        entries[b].linears[role].act.set_range(lo, hi)
    points = [{"sample": i, "entropy": float(entropy[i]), "ded": float(ded[i]), "qerr": float(qerr[i]),
               "greedy_error": float(greedy[i]), "joint_error": float(joint[i])} for i in range(len(ded))]
    xs_e = [p["entropy"] for p in points]
    xs_q = [p["qerr"] for p in points]
    ys_d = [p["ded"] for p in points]
    return DEDAnalysis(layer=k, block=block, points=points, fit=linear_fit(xs_e, ys_d),
                       qerr_fit=linear_fit(xs_q, ys_d), n_samples=len(points))


def ded_analysis(handle_fp: VLMHandle, cfg_or_result, layer: int = 0, n_samples: int | None = None,
                 depth: int = 2, progress=None, cancel=None) -> DEDAnalysis:
    """DED per calibration sample for the block of ``depth`` decoder layers starting at ``layer``."""
    return ded_sweep(handle_fp, cfg_or_result, [layer], n_samples, depth, progress, cancel)[0]
