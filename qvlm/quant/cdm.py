"""Cross-layer dependency mining on the LLM decoder (paper §3.2; design note §4.3, §8.3 step 4).

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
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from qvlm.models.layer_map import LANGUAGE_STYLES, VISION_STYLES
from qvlm.progress import STAGE_ENTROPY, STAGE_SEARCH, check_cancel, report
from qvlm.quant.calibration import LayerInputs, mse_over, observing, release_records, run_layer
from qvlm.quant.entropy import pair_entropy, residual_grid
from qvlm.quant.partition import partition_layers
from qvlm.quant.quantizers import percentile_ranges
from qvlm.quant.search import BlockSearch, coordinate_search, exhaustive_search

if TYPE_CHECKING:
    from qvlm.quant.config import QuantConfig
    from qvlm.quant.run import QuantRun

Table = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class EntropyPass:
    per_sample: torch.Tensor  # [n_layers - 1, n_samples], D(k, k+1) per calibration sample
    tables: list[Table]  # per layer: role -> [(lo, hi) per percentile]
    grids: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
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
                 cfg: "QuantConfig", cancel=None, progress=None) -> EntropyPass:
    """Percentile tables and per-sample D(k, k+1) for these decoder layers (one quantized-path pass).

    Reads ``a_bits``, ``percentiles``, ``percentile_source``, ``entropy_site``, ``soft_temperature``
    and ``soft_delta_mode`` from ``cfg``.
    """
    xs, xr = xq0, xr0
    per_sample: list[torch.Tensor] = []
    tables: list[Table] = []
    grids: list[tuple[torch.Tensor, torch.Tensor]] = []
    prev_site: list[torch.Tensor] | None = None
    d_seconds = 0.0
    n = len(entries)
    for k, entry in enumerate(entries):
        check_cancel(cancel, "quantization")
        qs = {role: lin.act for role, lin in entry.linears.items() if getattr(lin, "act", None) is not None}
        with observing(qs.values()):
            ys = run_layer(entry.module, inputs, xs, cancel)
        if cfg.percentile_source == "fp":
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
                cache[key] = percentile_ranges(view, tuple(cfg.percentiles))
            table[role] = cache[key]
        tables.append(table)
        if cfg.entropy_site == "attn_input" and "q" in qs:
            site = qs["q"].records
            grid = qs["q"].grid()
        else:
            site = xs
            grid = residual_grid(xs, inputs.masks, cfg.a_bits)
        grids.append(grid)
        if prev_site is not None:
            t_d = time.perf_counter()
            d = torch.cat([
                pair_entropy(a, b, grids[k - 1], grid, cfg.a_bits, m, cfg.soft_temperature, cfg.soft_delta_mode)
                for a, b, m in zip(prev_site, site, inputs.masks)
            ])
            per_sample.append(d.cpu())
            d_seconds += time.perf_counter() - t_d
        prev_site = list(site)
        release_records(qs.values())
        del source, cache
        xs = ys
        report(progress, STAGE_ENTROPY, (k + 1) / n, f"layer {k + 1}/{n}")
    stacked = torch.stack(per_sample) if per_sample else torch.zeros(0, len(xq0) and sum(x.shape[0] for x in xq0))
    return EntropyPass(stacked, tables, grids, d_seconds)


def apply_candidate(entry, table: Table, c: int) -> None:
    for role, lin in entry.linears.items():
        if role in table:
            lin.act.set_range(*table[role][c])


@dataclass
class BlockOutcome:
    block: list[int]
    search: BlockSearch
    outputs: list[torch.Tensor]
    fp_outputs: list[torch.Tensor]


@torch.no_grad()
def search_blocks(entries, fp_entries, inputs: LayerInputs, xq0: list[torch.Tensor], xr0: list[torch.Tensor],
                  tables: list[Table], blocks: list[list[int]], n_cands: int, mode: str = "exhaustive",
                  cancel=None, progress=None, on_block: Callable[[BlockOutcome], None] | None = None) -> list[BlockOutcome]:
    """Bottom-up joint search per block; leaves every layer at its chosen candidate."""
    total = sum(sum(n_cands ** (j + 1) for j in range(len(b))) if mode == "exhaustive" else n_cands * len(b)
                for b in blocks)
    done = {"passes": 0}
    xs, xr = xq0, xr0
    outcomes = []
    for bi, block in enumerate(blocks):
        check_cancel(cancel, "quantization")
        refs = []
        for k in block:
            xr = run_layer(fp_entries[k].module, inputs, xr, cancel)
            refs.append(xr)

        def apply(j: int, c: int) -> None:
            apply_candidate(entries[block[j]], tables[block[j]], c)

        def forward(j: int, zs: list[torch.Tensor]) -> list[torch.Tensor]:
            return run_layer(entries[block[j]].module, inputs, zs, cancel)

        def error(j: int, ys: list[torch.Tensor]) -> torch.Tensor:
            return mse_over(ys, refs[j], inputs.masks)

        def on_pass() -> None:
            done["passes"] += 1
            report(progress, STAGE_SEARCH, min(1.0, done["passes"] / max(1, total)), f"block {bi + 1}/{len(blocks)}")

        search = (exhaustive_search if mode == "exhaustive" else coordinate_search)(
            len(block), n_cands, apply, forward, error, xs, on_pass=on_pass)
        outs = search.outputs
        ys = outs[-1]
        outcome = BlockOutcome(block, search, outs, refs)
        outcomes.append(outcome)
        if on_block:
            on_block(outcome)
        xs = ys
    report(progress, STAGE_SEARCH, 1.0, f"block {len(blocks)}/{len(blocks)}")
    return outcomes


@dataclass(frozen=True)
class CrossLayerSearch:
    """Cross-layer dependency mining (§3.2): entropy -> Eq. 7 blocks -> Eq. 3 joint search per block.

    Its settings are the run config's CDM fields (percentiles, percentile_source, entropy_site,
    soft_temperature, soft_delta_mode, h0_rule, max_block_depth, joint_search).
    """

    name: ClassVar[str] = STAGE_SEARCH

    def run(self, qrun: "QuantRun") -> None:
        cfg = qrun.config
        if not cfg.quantize_language:
            return
        entries, fp_entries, inputs = qrun.qmap.language, qrun.fp.layer_map.language, qrun.language_inputs
        with torch.no_grad():
            with qrun.timed(STAGE_ENTROPY):
                xq0 = qrun.language_input()
                ep = entropy_pass(entries, fp_entries, inputs, xq0, inputs.hidden, cfg, qrun.cancel, qrun.progress)
            qrun.timing_details["entropy_eq45"] = round(ep.entropy_seconds, 4)  # part of "entropy"
            qrun.entropies_per_sample = ep.per_sample
            with qrun.timed(STAGE_SEARCH):
                qrun.h0 = cfg.h0_value(ep.entropies)
                qrun.blocks = partition_layers(ep.entropies, qrun.h0, cfg.max_block_depth)
                outcomes = search_blocks(entries, fp_entries, inputs, xq0, inputs.hidden, ep.tables, qrun.blocks,
                                         len(cfg.percentiles), cfg.joint_search, qrun.cancel, qrun.progress)
                grid = [float(p) for p in cfg.percentiles]
                for o in outcomes:
                    for j, k in enumerate(o.block):
                        qrun.percentiles[k] = grid[o.search.choice[j]]
                    qrun.search_log.append({"block": o.block, "choice": [grid[c] for c in o.search.choice],
                                            "greedy": [grid[c] for c in o.search.greedy_choice],
                                            "error": o.search.error, "greedy_error": o.search.greedy_error,
                                            "layer_passes": o.search.layer_passes})
