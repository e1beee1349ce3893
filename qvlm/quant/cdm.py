"""Cross-layer dependency mining on the LLM decoder (paper §3.2, Eqs. 3-7).

1. One pass over the calibration set on the quantized path (current ranges): per decoder layer,
   the percentile candidate table of every activation quantizer and the entropy-site
   activations; D(k, k+1) per sample by Eqs. 4-5.
2. Partition by Eq. 7 (threshold h0, maximum depth).
3. Bottom-up over blocks: joint search of one percentile per layer minimising the block-output
   error against the FP model (Eq. 3), the inputs being the outputs of the already-quantized
   blocks below (the Eq. 1 propagation constraint).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from qvlm.models.layer_map import LANGUAGE_STYLES, VISION_STYLES
from qvlm.utils.progress import STAGE_ENTROPY, STAGE_SEARCH, check_cancel, report
from qvlm.quant.acceptance import OutputCheck, acceptance_checks, decide_block
from qvlm.quant.calibration import LayerInputs, mse_over, observing, release_records, run_layer
from qvlm.quant.config import H0_RULE, QuantConfig
from qvlm.quant.entropy import pair_entropy, residual_grid
from qvlm.quant.partition import partition_layers
from qvlm.quant.quantizers import percentile_ranges
from qvlm.quant.records import BlockSearchRow
from qvlm.quant.search import BlockSearch, coordinate_search, exhaustive_search

if TYPE_CHECKING:
    from qvlm.quant.run import QuantRun

Table = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class EntropyPass:
    per_sample: torch.Tensor  # [n_layers - 1, n_samples], D(k, k+1) per calibration sample
    tables: list[Table]  # per layer: role -> [(lo, hi) per percentile]
    entropy_seconds: float = 0.0  # the part spent on Eqs. 4-5 (the rest: the pass and percentile tables)

    @property
    def entropies(self) -> list[float]:
        return [float(v) for v in self.per_sample.mean(dim=1)] if self.per_sample.numel() else []


def _fp_records(fp_layer: torch.nn.Module, linears: dict, inputs: LayerInputs, xr: list[torch.Tensor]) -> dict[str, list]:
    """Inputs of each Linear of the FP layer on the FP path (hooks on a throwaway copy of the layer)."""
    layer = copy.deepcopy(fp_layer)
    records: dict[str, list] = {role: [] for role in linears}
    hooks = []
    for name, mod in layer.named_modules():
        for role, path in _role_paths(fp_layer, linears).items():
            if name == path:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, role=role: records[role].append(a[0].detach())))
    run_layer(layer, inputs, xr)
    for h in hooks:
        h.remove()
    return records


def _role_paths(fp_layer: torch.nn.Module, linears: dict) -> dict[str, str]:
    for styles in (LANGUAGE_STYLES, VISION_STYLES):
        for roles in styles.values():
            if set(roles) == set(linears):
                return roles
    raise ValueError("cannot locate the layer's Linears for percentile_source='fp'")


@torch.no_grad()
def entropy_pass(entries, fp_entries, inputs: LayerInputs, xq0: list[torch.Tensor], xr0: list[torch.Tensor],
                 cdm: "CrossLayerDependencyMining", cfg: "QuantConfig", cancel=None, progress=None) -> EntropyPass:
    """Percentile tables and per-sample D(k, k+1) for these decoder layers (one quantized-path pass).

    Reads ``percentiles`` and ``percentile_source`` from ``cdm``; the entropy estimator's ``a_bits``,
    ``entropy_site``, ``soft_temperature`` and ``soft_delta_mode`` from the run's ``cfg``.
    """
    xs, xr = xq0, xr0
    per_sample: list[torch.Tensor] = []
    tables: list[Table] = []
    prev_grid: tuple[torch.Tensor, torch.Tensor] | None = None
    prev_site: list[torch.Tensor] | None = None
    d_seconds = 0.0
    n = len(entries)
    for k, entry in enumerate(entries):
        check_cancel(cancel, "quantization")
        qs = {role: lin.act for role, lin in entry.linears.items() if getattr(lin, "act", None) is not None}
        with observing(qs.values()):
            ys = run_layer(entry.module, inputs, xs, cancel)
        if cdm.percentile_source == "fp":
            source = _fp_records(fp_entries[k].module, entry.linears, inputs, xr)
            xr = run_layer(fp_entries[k].module, inputs, xr, cancel)
        else:
            source = {role: q.records for role, q in qs.items()}
        cache: dict[tuple, list] = {}
        table: Table = {}
        for role, q in qs.items():
            recs = source[role]
            key = (recs[0].data_ptr(), tuple(recs[0].shape))
            if key not in cache:
                view = torch.cat([q.stat_view(r, m) for r, m in zip(recs, inputs.masks)])
                cache[key] = percentile_ranges(view, tuple(cdm.percentiles))
            # Candidate 0 is the incumbent (the ranges the layer has now: the layer-wise init's, or
            # VEO's): with it in every table the search can always keep what it started from.
            table[role] = [tuple(t.clone() for t in q.get_range())] + cache[key]
        tables.append(table)
        if cfg.entropy_site == "attn_input" and "q" in qs:
            site = qs["q"].records
            grid = qs["q"].grid()
        else:
            site = xs
            grid = residual_grid(xs, inputs.masks, cfg.a_bits)
        if prev_site is not None:
            t_d = time.perf_counter()
            d = torch.cat([
                pair_entropy(a, b, prev_grid, grid, cfg.a_bits, m, cfg.soft_temperature, cfg.soft_delta_mode)
                for a, b, m in zip(prev_site, site, inputs.masks)
            ])
            per_sample.append(d.cpu())
            d_seconds += time.perf_counter() - t_d
        prev_site, prev_grid = list(site), grid
        release_records(qs.values())
        del source, cache
        xs = ys
        report(progress, STAGE_ENTROPY, (k + 1) / n, f"layer {k + 1}/{n}")
    stacked = torch.stack(per_sample) if per_sample else torch.zeros(0, len(xq0) and sum(x.shape[0] for x in xq0))
    return EntropyPass(stacked, tables, d_seconds)


def apply_candidate(entry, table: Table, c: int) -> None:
    for role, lin in entry.linears.items():
        if role in table:
            lin.act.set_range(*table[role][c])


class BlockObjective:
    """Per-sample error of a block's layer j against FP, by ``CrossLayerDependencyMining.block_objective``.

    * "residual": the layer's output (the raw residual stream) vs the FP layer's output.
    * "normed_hidden": both passed through the FP *next* layer's input RMSNorm (the final norm
      after the last layer): the hidden state the next layer actually computes with. The raw
      residual is dominated by a few huge channels that every later layer normalises away.
    * "linear_output": the output of the layer's last Linear (down_proj: the MLP output added
      to the residual), the paper's Eq. 3 reading ("the output of the last layer"'s linear).

    The FP layers are never hooked: "linear_output" hooks a throwaway copy of each FP layer.
    """

    def __init__(self, objective: str, entries, fp_entries, final_norm: torch.nn.Module | None,
                 inputs: LayerInputs, cancel=None) -> None:
        self.objective = objective
        self.entries, self.fp_entries = entries, fp_entries
        self.final_norm = final_norm
        self.inputs, self.cancel = inputs, cancel

    def _norm_after(self, k: int) -> torch.nn.Module | None:
        if k + 1 < len(self.fp_entries):
            return self.fp_entries[k + 1].norm_before("q")  # the next layer's input norm (the layer map's)
        return self.final_norm

    def _run_capturing_last_linear(self, layer: torch.nn.Module, last: torch.nn.Module,
                                   xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(layer outputs, outputs of its Linear ``last``) for every batch."""
        outs: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda m, a, o: outs.append(o))
        try:
            ys = run_layer(layer, self.inputs, xs, self.cancel)
        finally:
            handle.remove()
        return ys, outs

    def reference(self, k: int, xr: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(FP output of layer k, what the objective compares for it)."""
        if self.objective == "linear_output":
            layer = copy.deepcopy(self.fp_entries[k].module)
            roles = _role_paths(self.fp_entries[k].module, self.fp_entries[k].linears)
            return self._run_capturing_last_linear(layer, layer.get_submodule(list(roles.values())[-1]), xr)
        yr = run_layer(self.fp_entries[k].module, self.inputs, xr, self.cancel)
        return yr, self.view(k, yr)

    def view(self, k: int, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.objective == "normed_hidden":
            norm = self._norm_after(k)
            if norm is not None:
                return [norm(y) for y in ys]
        return ys

    def forward(self, k: int, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(quantized output of layer k, what the objective compares for it)."""
        if self.objective == "linear_output":
            last = list(self.entries[k].linears.values())[-1]
            return self._run_capturing_last_linear(self.entries[k].module, last, xs)
        ys = run_layer(self.entries[k].module, self.inputs, xs, self.cancel)
        return ys, self.view(k, ys)


@torch.no_grad()
def search_blocks(entries, fp_entries, inputs: LayerInputs, xq0: list[torch.Tensor], xr0: list[torch.Tensor],
                  tables: list[Table], blocks: list[list[int]], n_cands: int, mode: str = "exhaustive",
                  objective: str = "residual", final_norm: torch.nn.Module | None = None,
                  cancel=None, progress=None,
                  checks: Sequence[OutputCheck] = ()) -> list[tuple[list[int], BlockSearch]]:
    """Bottom-up joint search per block; leaves every layer at its chosen candidate.

    Each block starts from the quantized-path output of the blocks below (Eq. 1's propagation);
    its layers are scored by ``objective`` (:class:`BlockObjective`). With ``checks``
    (:func:`~qvlm.quant.acceptance.acceptance_checks`) a block's choice is kept only if, propagated
    through the rest of the model (later layers at their incumbent ranges), it lowers the error at
    the LLM's output on every check's pairs (:func:`~qvlm.quant.acceptance.decide_block`); otherwise
    the block goes back to its incumbent.
    ``search.accepted`` records which, ``search.accept_errors`` the errors compared.
    Progress: the fraction is blocks finished / blocks (a block's passes only update the message).
    """
    n_blocks = len(blocks)
    report(progress, STAGE_SEARCH, 0.0, f"{n_blocks} blocks")
    score = BlockObjective(objective, entries, fp_entries, final_norm, inputs, cancel)
    xs, xr = xq0, xr0
    outcomes = []
    for bi, block in enumerate(blocks):
        check_cancel(cancel, "quantization")
        refs = []
        for k in block:
            xr, ref = score.reference(k, xr)
            refs.append(ref)
        compared: dict[int, list[torch.Tensor]] = {}
        passes = 0

        def apply(j: int, c: int) -> None:
            apply_candidate(entries[block[j]], tables[block[j]], c)

        def forward(j: int, zs: list[torch.Tensor]) -> list[torch.Tensor]:
            ys, compared[j] = score.forward(block[j], zs)
            return ys

        def error(j: int, ys: list[torch.Tensor]) -> torch.Tensor:  # right after forward(j, ...)
            return mse_over(compared[j], refs[j], inputs.masks)

        def on_pass() -> None:
            nonlocal passes
            passes += 1
            report(progress, STAGE_SEARCH, bi / n_blocks, f"block {bi + 1}/{n_blocks}, layer pass {passes}")

        if mode == "exhaustive":
            search = exhaustive_search(len(block), n_cands, apply, forward, error, xs, on_pass=on_pass)
        else:  # candidate 0 of every layer is its incumbent: start there when it beats greedy
            search = coordinate_search(len(block), n_cands, apply, forward, error, xs, on_pass=on_pass,
                                       start=(0,) * len(block))
        outcomes.append((block, search))
        xs = search.outputs[-1]
        search.outputs = None  # the next block's input is all that is needed of them
        if checks and any(c != 0 for c in search.choice):
            decision = decide_block(entries, block, tuple(search.choice), apply, checks)
            search.accepted, search.accept_errors = decision
            xs = checks[0].xs
        else:
            for chk in checks:  # the block is at its incumbent: follow it
                chk.xs = xs if chk.inputs is inputs else chk.block_output([entries[k].module for k in block])
        report(progress, STAGE_SEARCH, (bi + 1) / n_blocks, f"block {bi + 1}/{n_blocks} done")
    return outcomes


def unsearchable(cfg: "QuantConfig") -> str | None:
    """Why the language layers have no percentile ranges to search (None when they have): what CDM skips
    for and what the DED analysis, which scores the same candidates, refuses for."""
    if cfg.act_granularity_language == "dynamic_token":
        return "dynamic_token language ranges are each token's min/max at run time: no percentile ranges to search"
    return None


@dataclass(frozen=True)
class CrossLayerDependencyMining:
    """Cross-layer dependency mining, CDM (§3.2): entropy -> Eq. 7 blocks -> Eq. 3 joint search per block.

    A configured stage: its settings are its fields, saved in the run's config under the names of
    :data:`SAVED_AS`, where each default's reason is written (``QuantConfig.cdm_accept``, ...);
    ``recipes.configured_stages`` builds the stage from a config, ``QuantConfig.with_stages`` saves it.
    The entropy estimator it shares with VEO (``a_bits``, ``soft_*``, ``entropy_site``) stays the run's.
    Every layer's candidates are its incumbent ranges plus the percentile grid, so a block's
    searched error is never above the error of the ranges the search started from.
    """

    name: ClassVar[str] = STAGE_SEARCH
    SAVED_AS: ClassVar[dict[str, str]] = {
        "percentiles": "percentiles", "percentile_source": "percentile_source", "max_block_depth": "max_block_depth",
        "h0_rule": "h0_rule", "joint_search": "joint_search", "block_objective": "block_objective",
        "accept": "cdm_accept", "accept_metric": "cdm_accept_metric", "holdout_images": "cdm_holdout_images"}
    """Field -> its name in the saved (flat) config."""

    percentiles: tuple[float, ...] = QuantConfig.percentiles
    percentile_source: str = QuantConfig.percentile_source
    max_block_depth: int = QuantConfig.max_block_depth
    h0_rule: str = QuantConfig.h0_rule
    joint_search: str = QuantConfig.joint_search
    block_objective: str = QuantConfig.block_objective
    accept: str = QuantConfig.cdm_accept
    accept_metric: str = QuantConfig.cdm_accept_metric
    holdout_images: int | None = QuantConfig.cdm_holdout_images

    def h0_value(self, values: list[float]) -> float:
        """The Eq. 7 threshold for these D(k,k+1) values, by ``h0_rule``."""
        m = H0_RULE.match(self.h0_rule.strip())
        if not m:
            raise ValueError(f"h0_rule {self.h0_rule!r} not understood")
        if m.group("v") is not None:
            return float(m.group("v"))
        if not values:
            return math.inf
        if m.group(1) == "mean":
            return float(statistics.fmean(values))
        q = 0.5 if m.group(1) == "median" else float(m.group("q"))
        s = sorted(values)
        pos = q * (len(s) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(s) - 1)
        return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))

    def candidate_labels(self) -> list[float | None]:
        """What candidate c of every layer's table is: 0 the incumbent ranges (None), c >= 1 the
        percentile ``percentiles[c - 1]`` of the layer's quantized-path input."""
        return [None] + [float(p) for p in self.percentiles]

    def run(self, qrun: "QuantRun") -> None:
        cfg = qrun.config
        if not cfg.quantize_language:
            return
        if reason := unsearchable(cfg):
            qrun.notes.cdm_skipped = reason
            qrun.report(STAGE_SEARCH, 1.0, "skipped: " + reason)
            return
        entries, fp_entries, inputs = qrun.qmap.language, qrun.fp.layer_map.language, qrun.language_inputs
        with torch.no_grad():
            with qrun.timed(STAGE_ENTROPY):
                qrun.report(STAGE_ENTROPY, 0.0, "quantized-path input of the decoder")
                xq0 = qrun.language_input()
                ep = entropy_pass(entries, fp_entries, inputs, xq0, inputs.hidden, self, cfg, qrun.cancel,
                                  qrun.progress)
            qrun.timing_details["entropy_eq45"] = round(ep.entropy_seconds, 4)  # part of "entropy"
            qrun.entropies_per_sample = ep.per_sample
            with qrun.timed(STAGE_SEARCH):
                qrun.h0 = self.h0_value(ep.entropies)
                qrun.blocks = partition_layers(ep.entropies, qrun.h0, self.max_block_depth)
                setup = time.perf_counter()
                checks = acceptance_checks(qrun, xq0, self.accept, self.accept_metric, self.holdout_images)
                setup = time.perf_counter() - setup
                outcomes = search_blocks(entries, fp_entries, inputs, xq0, inputs.hidden, ep.tables, qrun.blocks,
                                         len(self.percentiles) + 1, self.joint_search, self.block_objective,
                                         qrun.fp.layer_map.final_norm, qrun.cancel, qrun.progress, checks)
                if checks:  # part of "search", kept apart: it grows with the layers after each decided block
                    qrun.timing_details["search_acceptance"] = round(setup + sum(c.seconds for c in checks), 4)
                labels = self.candidate_labels()
                for block, search in outcomes:
                    for j, k in enumerate(block):
                        qrun.percentiles[k] = labels[search.choice[j]]
                    incumbent = search.prefix_errors.get((0,) * len(block))
                    accepted = search.accepted
                    if not accepted:
                        for k in block:
                            qrun.percentiles[k] = labels[0]
                    qrun.search.append(BlockSearchRow(
                        block=block, choice=[labels[c] for c in search.choice], accepted=accepted,
                        greedy=[labels[c] for c in search.greedy_choice],
                        error=search.error, greedy_error=search.greedy_error,
                        incumbent_error=None if incumbent is None else float(incumbent.mean()),
                        objective=self.block_objective, layer_passes=search.layer_passes,
                        accept_errors=search.accept_errors))
