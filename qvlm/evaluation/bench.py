"""``python -m qvlm bench``: FP and every recipe at W8A8, W6A6, W4A4 (and W3A3 when needed), one harness.

Writes ``bench.json`` and ``bench.md`` to the output folder after every run (a long bench that is
interrupted keeps what it measured). Besides accuracy it measures the issue's timing targets
(full ``qvlm`` recipe time; CDM search vs the layer-wise greedy search on the same grid) and the
entropy-vs-DED R^2 per decoder layer. Every verdict in the Markdown is computed from the numbers.

Definitions:
* calibration seconds: building the calibration batches, copying the model, capturing the first
  layers' inputs;
* search seconds: everything that then decides the quantizer (layer-wise init, VEO, entropy,
  block search); the final per-layer error measurement is bookkeeping and excluded.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from qvlm.data import QUESTION_TYPES, get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.quant import RECIPES, QuantConfig, quantize
from qvlm.evaluation.reference import BNB_NF4, BNB_NF4_LABEL, load_bnb_nf4
from qvlm.utils.stats import mcnemar, paired_verdict

DEFAULT_BITS = ("W8A8", "W6A6", "W4A4", "W4A3")
SEARCH_STAGES = ("init", "veo", "entropy", "search")


@dataclass
class BenchOptions:
    model: str = "bundled"
    bits: tuple[str, ...] = DEFAULT_BITS
    recipes: tuple[str, ...] = tuple(r for r in RECIPES if r != "fp")
    limit: int | None = None
    calib_size: int = 64
    batch_size: int = 64
    w3a3: str = "auto"  # "auto": add W3A3 if every W4A4 recipe is within 1 pt of FP; "yes"; "no"
    ded: bool = True
    ded_samples: int = 64
    ded_bits: tuple[str, ...] = ("W4A4", "W4A3")
    references: tuple[str, ...] = (BNB_NF4,)
    """Reference rows measured next to FP: ``"bnb-nf4"`` (:func:`qvlm.evaluation.reference.load_bnb_nf4`, as W4A16)."""
    timing_baseline: bool = True
    timing_repeats: int = 2
    calib_sweep: tuple[int, ...] = (256,)
    """Extra calibration sizes, run for ``sweep_recipes`` at ``sweep_bits`` (static ranges need coverage)."""
    sweep_recipes: tuple[str, ...] = ("rtn", "qvlm")
    sweep_bits: tuple[str, ...] = ("W8A8", "W4A4")
    variants: tuple[tuple[str, str, tuple[tuple[str, object], ...]], ...] = (
        ("W4A4", "qlora", (("weight_format", "uniform"),)),
        ("W4A4", "qvlm", (("weight_format", "uniform"),)),
    )
    """Extra (bits, recipe, config overrides) rows, e.g. the paper-literal uniform weights for Q-VLM."""
    out_dir: Path = Path("benchmarks/results")
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)


def _row(bits: str, recipe: str, ev, result=None, seconds: float | None = None) -> dict:
    row = {"bits": bits, "recipe": recipe, "accuracy": ev.accuracy, "per_type": ev.per_type, "n": ev.n,
           "eval_seconds": round(ev.seconds, 2), "answers_per_second": round(ev.answers_per_second, 1),
           "calib_size": None if result is None else result.config.calib_size,
           "correct": [bool(p["correct"]) for p in ev.predictions]}
    if result is not None:
        t = result.timings
        row.update({
            "calibration_s": round(t.get("calibration", 0.0), 3),
            "search_s": round(sum(t.get(s, 0.0) for s in SEARCH_STAGES), 3),
            "quantize_s": round(seconds if seconds is not None else t.get("total", 0.0), 3),
            "timings": t,
            "output_mse": result.output_mse,
            "blocks": result.blocks,
            "entropies": result.entropies,
            "h0": result.h0,
            "percentiles": {str(k): v for k, v in result.percentiles.items()},
            "veo_final_loss": result.veo_losses[-1] if result.veo_losses else None,
        })
    return row


def measure_row(handle, samples, bits: str, recipe: str, calib_size: int, overrides: dict | None = None,
                batch_size: int = 64) -> dict:
    """Quantize ``handle`` by one recipe and config, answer ``samples``: one row with per-question correctness.

    The one measurement loop of the bench and of ``benchmarks/paired_runs.py``, so their rows compare.
    """
    cfg = QuantConfig.from_bits(bits, recipe=recipe, calib_size=calib_size, **(overrides or {}))
    start = time.perf_counter()
    result = quantize(handle, cfg)
    seconds = time.perf_counter() - start
    ev = evaluate(result.handle.model, result.handle.processor, samples, batch_size=batch_size)
    row = _row(bits, recipe, ev, result, seconds)
    if overrides:
        row["overrides"] = dict(overrides)
    row["search"], row["veo_holdout"] = result.search, result.veo_holdout
    del result
    gc.collect()
    return row


def run_bench(opts: BenchOptions) -> dict:
    from qvlm.evaluation.analysis import dependency_diagnostics
    from qvlm.models import load_vlm

    torch.manual_seed(0)
    handle = load_vlm(opts.model)
    samples = get_task(handle.task).evaluation_subset(opts.limit)
    out = {
        "model": handle.name,
        "task": handle.task,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform(), "device": str(handle.device)},
        "eval_questions": len(samples),
        "limit": opts.limit,
        "calib_size": opts.calib_size,
        "rows": [],
        "timing": {},
        "ded": [],
        "notes": [],
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (opts.out_dir / "bench.json").write_text(json.dumps(out, indent=2, default=str))
        (opts.out_dir / "bench.md").write_text(render_markdown(out))

    opts.log(f"FP on {len(samples)} questions")
    fp_eval = evaluate(handle.model, handle.processor, samples, batch_size=opts.batch_size)
    out["rows"].append(_row("FP", "fp", fp_eval))
    save()
    if BNB_NF4 in opts.references:
        opts.log(f"{BNB_NF4_LABEL} on {len(samples)} questions")
        ref = load_bnb_nf4(opts.model)
        ev = evaluate(ref.model, ref.processor, samples, batch_size=opts.batch_size)
        out["rows"].append(_row("W4A16", BNB_NF4, ev))
        del ref
        save()

    def measure(bits: str, recipe: str, calib_size: int, overrides: dict | None = None) -> dict:
        """One measured row appended to the output, which is saved at once."""
        row = measure_row(handle, samples, bits, recipe, calib_size, overrides, opts.batch_size)
        out["rows"].append(row)
        extra = f" {dict(overrides)}" if overrides else ""
        opts.log(f"{bits} {recipe:9s}{extra} calib {calib_size}: acc {row['accuracy']:.4f}  quantize "
                 f"{row['quantize_s']:.1f} s (calibration {row['calibration_s']:.1f} s, search {row['search_s']:.1f} s)")
        save()
        return row

    bits_list = list(opts.bits)
    done_bits: set[str] = set()
    while bits_list:
        bits = bits_list.pop(0)
        done_bits.add(bits)
        for recipe in opts.recipes:
            measure(bits, recipe, opts.calib_size)
        if bits == "W4A4" and "W3A3" not in done_bits and "W3A3" not in bits_list:
            w4 = [r for r in out["rows"] if r["bits"] == "W4A4"]
            no_gap = all(abs(r["accuracy"] - fp_eval.accuracy) <= 0.01 for r in w4)
            if opts.w3a3 == "yes" or (opts.w3a3 == "auto" and no_gap):
                out["notes"].append("W3A3 added: " + ("requested." if opts.w3a3 == "yes" else
                                    "every recipe at W4A4 is within 1 pt of FP, so W4A4 shows no gap."))
                bits_list.append("W3A3")

    for bits, recipe, overrides in opts.variants:
        measure(bits, recipe, opts.calib_size, dict(overrides))

    for size in opts.calib_sweep:
        for bits in opts.sweep_bits:
            for recipe in opts.sweep_recipes:
                measure(bits, recipe, size)

    if opts.timing_baseline:
        opts.log("timing: layer-wise greedy search (max_block_depth=1) vs CDM, full qvlm, qlora at W4A4")

        def best_of(**kw):
            runs = [quantize(handle, QuantConfig.from_bits("W4A4", calib_size=opts.calib_size, **kw))
                    for _ in range(max(1, opts.timing_repeats))]
            return min(runs, key=lambda r: r.timings.get("total", 0.0))

        greedy = best_of(recipe="qvlm-cdm", max_block_depth=1)
        cdm = best_of(recipe="qvlm-cdm", joint_search="exhaustive")
        coord = best_of(recipe="qvlm-cdm", joint_search="coordinate")
        full = best_of(recipe="qvlm")
        qlora = best_of(recipe="qlora")

        def tables_s(r) -> float:  # the quantized pass + percentile tables, without Eqs. 4-5
            return r.timings.get("entropy", 0.0) - r.timing_details.get("entropy_eq45", 0.0)

        out["timing"] = {
            "repeats": opts.timing_repeats,
            "layerwise_search_s": greedy.timings.get("search", 0.0),
            "layerwise_tables_s": tables_s(greedy),
            "cdm_search_s": cdm.timings.get("search", 0.0),
            "cdm_entropy_s": cdm.timings.get("entropy", 0.0),
            "cdm_entropy_eq45_s": cdm.timing_details.get("entropy_eq45", 0.0),
            "cdm_blocks": cdm.blocks,
            "cdm_layer_passes": sum(s["layer_passes"] for s in cdm.search),
            "layerwise_layer_passes": sum(s["layer_passes"] for s in greedy.search),
            "cdm_coordinate_search_s": coord.timings.get("search", 0.0),
            "cdm_coordinate_entropy_s": coord.timings.get("entropy", 0.0),
            "cdm_coordinate_layer_passes": sum(s["layer_passes"] for s in coord.search),
            "cdm_coordinate_output_mse": coord.output_mse,
            "cdm_exhaustive_output_mse": cdm.output_mse,
            "layerwise_output_mse": greedy.output_mse,
            "qvlm_total_s": full.timings.get("total", 0.0),
            "qvlm_timings": full.timings,
            "qlora_total_s": qlora.timings.get("total", 0.0),
            "qvlm_cdm_total_s": cdm.timings.get("total", 0.0),
        }
        del greedy, cdm, full, qlora, coord
        gc.collect()
        save()

    if opts.ded:
        for bits in opts.ded_bits:
            opts.log(f"DED and dependency diagnostics at {bits}, every decoder pair, {opts.ded_samples} samples")
            report = dependency_diagnostics(
                handle, QuantConfig.from_bits(bits, recipe="qvlm-cdm", calib_size=opts.ded_samples),
                n_samples=opts.ded_samples)
            out["ded"] += [{"bits": bits, **row} for row in report.to_dict()["pairs"]]
            out.setdefault("verdicts_dependency", {})[bits] = report.verdict
            save()
    out["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _overrides(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (row.get("overrides") or {}).items())


def _find(rows: list[dict], bits: str, recipe: str) -> dict | None:
    return next((r for r in rows if r["bits"] == bits and r["recipe"] == recipe), None)


def paired_verdicts(rows: list[dict], bits: str, baselines: tuple[str, ...] = ("qlora", "rtn")) -> list[str]:
    """Every recipe at ``bits`` against each baseline by McNemar's test on the same questions."""
    lines = []
    for base in baselines:
        b = _find(rows, bits, base)
        if b is None or "correct" not in b:
            continue
        for r in rows:
            if r["bits"] != bits or r["recipe"] == base or "correct" not in r or len(r["correct"]) != len(b["correct"]):
                continue
            test = mcnemar(r["correct"], b["correct"])
            lines.append(f"{bits}: {paired_verdict(r['recipe'], base, test)}; "
                         f"{_pct(r['accuracy'])} vs {_pct(b['accuracy'])}.")
    return lines


def reference_verdicts(rows: list[dict], reference: str = BNB_NF4) -> list[str]:
    """The reference row against FP, and every W4A4 recipe against the reference (McNemar, same questions)."""
    ref = next((r for r in rows if r["recipe"] == reference and "correct" in r), None)
    if ref is None:
        return []
    lines = []
    others = [r for r in rows if (r["bits"] == "W4A4" or r["recipe"] == "fp") and "correct" in r
              and len(r["correct"]) == len(ref["correct"])]
    for r in others:
        test = mcnemar(r["correct"], ref["correct"])
        lines.append(f"{r['bits']} vs {reference} ({ref['bits']}): {paired_verdict(r['recipe'], reference, test)}; "
                     f"{_pct(r['accuracy'])} vs {_pct(ref['accuracy'])}, {r.get('answers_per_second', '–')} vs "
                     f"{ref.get('answers_per_second', '–')} answers/s.")
    return lines


def verdicts(out: dict) -> list[str]:
    """The issue's targets, each judged from the measured rows."""
    rows = [r for r in out["rows"] if r.get("calib_size") in (None, out["calib_size"]) and not r.get("overrides")]
    fp = _find(rows, "FP", "fp")
    if fp is None:
        return []
    acc = fp["accuracy"]
    lines = []

    def gap(bits: str, recipe: str) -> float | None:
        r = _find(rows, bits, recipe)
        return None if r is None else acc - r["accuracy"]

    for bits, tol in (("W8A8", 0.002), ("W6A6", 0.005)):
        gaps = {r["recipe"]: acc - r["accuracy"] for r in rows if r["bits"] == bits}
        if gaps:
            worst = max(gaps.values())
            ok = [k for k, g in gaps.items() if g <= tol]
            lines.append(f"{bits} within {100 * tol:.1f} pt of FP: {len(ok)}/{len(gaps)} recipes "
                         f"(largest drop {100 * worst:.2f} pt, {max(gaps, key=gaps.get)}); "
                         f"qvlm drop {100 * gaps.get('qvlm', float('nan')):.2f} pt.")
    for bits in ("W4A4", "W4A3", "W3A3"):
        lines += paired_verdicts(rows, bits)
    lines += reference_verdicts(rows)
    for r in out["rows"]:
        if r.get("overrides"):
            lines.append(f"{r['bits']} {r['recipe']} with {_overrides(r)}: {100 * (r['accuracy'] - acc):+.2f} pt vs FP.")
        elif r.get("calib_size") not in (None, out["calib_size"]):
            lines.append(f"{r['bits']} {r['recipe']} with {r['calib_size']} calibration pairs: "
                         f"{100 * (r['accuracy'] - acc):+.2f} pt vs FP.")
    t = out.get("timing") or {}
    if t:
        total = t["qvlm_total_s"]
        lines.append(f"Full qvlm recipe W4A4 (calibration + init + VEO + CDM, best of {t['repeats']}): {total:.1f} s "
                     f"({'meets' if total <= 60 else 'misses'} the 60 s target).")
        lw = t["layerwise_search_s"] + t["layerwise_tables_s"]
        cdm = t["cdm_search_s"] + t["cdm_entropy_s"]
        coord = t["cdm_coordinate_search_s"] + t["cdm_coordinate_entropy_s"]
        if lw > 0:
            lines.append(
                f"CDM search (quantized pass + tables + Eqs. 4-5 + partition + exhaustive joint search, "
                f"{t['cdm_layer_passes']} layer passes) {cdm:.1f} s vs the layer-wise greedy baseline on the same "
                f"grid (quantized pass + tables + greedy search, {t['layerwise_layer_passes']} layer passes) "
                f"{lw:.1f} s: {cdm / lw:.2f}x ({'meets' if cdm / lw <= 1.5 else 'misses'} the 1.5x target). "
                f"With coordinate-descent joint search: {coord / lw:.2f}x. Whole recipes: qvlm-cdm "
                f"{t['qvlm_cdm_total_s']:.1f} s vs qlora {t['qlora_total_s']:.1f} s.")
    return lines


def render_markdown(out: dict) -> str:
    rows = out["rows"]
    fp = _find(rows, "FP", "fp")
    limit = out.get("limit")
    types_present = [t for t in QUESTION_TYPES if any(t in r["per_type"] for r in rows)]  # the model's task only
    task = out.get("task", "easy-vqa")  # runs stored before the task was recorded were all easy-VQA
    lines = [
        f"# Q-VLM bench: {out['model']}",
        "",
        f"- Evaluation: {out['eval_questions']} {get_task(task).title or task} test questions "
        f"({'full test split' if limit is None else f'fixed random subset, --limit {limit}'}), greedy decoding.",
        f"- Calibration: {out['calib_size']} train-split pairs (batch 8). Machine: {out['machine']['cpus']} CPUs, "
        f"torch {out['machine']['torch']}, {out['machine']['torch_threads']} threads, device {out['machine']['device']}.",
        f"- Started {out['started']}" + (f", finished {out['finished']}." if out.get("finished") else " (running)."),
        "- Search s = layer-wise init + VEO + entropy + block search; calibration s = batches, model copy, "
        "first-layer capture.",
        "",
        "| Bits | Recipe | Calib. pairs | Accuracy | Δ vs FP (pt) | " + " | ".join(types_present)
        + " | Calib. s | Search s | Quantize s | Answers/s |",
        "|---|---|---|---|---|" + "---|" * len(types_present) + "---|---|---|---|",
    ]
    for r in rows:
        delta = "" if fp is None or r is fp else f"{100 * (r['accuracy'] - fp['accuracy']):+.2f}"
        types = " | ".join(_pct(r["per_type"].get(t)) for t in types_present)
        name = BNB_NF4_LABEL if r["recipe"] == BNB_NF4 else r["recipe"] + (f" ({_overrides(r)})" if r.get("overrides") else "")
        lines.append(f"| {r['bits']} | {name} | {r.get('calib_size') or '–'} | {_pct(r['accuracy'])} | {delta} | {types} | "
                     f"{r.get('calibration_s', '–')} | {r.get('search_s', '–')} | {r.get('quantize_s', '–')} | "
                     f"{r.get('answers_per_second', '–')} |")
    v = verdicts(out)
    if v:
        lines += ["", "## Targets (computed from the table)", ""] + [f"- {x}" for x in v]
    if out.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in out["notes"]]
    t = out.get("timing") or {}
    if t:
        lines += ["", "## Timing detail (W4A4)", "", "```", json.dumps(t, indent=1, default=str), "```"]
    if out.get("ded"):
        lines += ["", "## Do the decoder layers interact? (layer-wise init, per calibration sample)", "",
                  "Interaction share: the part of a pair's block-error variance over the candidate grid that an "
                  "additive model leaves (0 = the errors add up). R² chance: what R² exceeds one time in twenty "
                  "with no correlation at all for n samples.", "",
                  "| Bits | Pair | interaction share | joint = greedy | DED = 0 | DED / controllable | controllable "
                  "share | gain | branch | R² entropy→DED | R² chance (5%) | R² qerr→DED | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in out["ded"]:
            lines.append(
                f"| {d.get('bits', 'W4A4')} | {d['layer']}–{d['layer'] + 1} | {_share(d.get('interaction_share'))} | "
                f"{'yes' if d.get('joint_equals_greedy', True) else 'no'} | {_share(d.get('zero_ded_fraction'))} | "
                f"{_num(d.get('ded_relative'))} | {_share(d.get('controllable_share'))} | {_num(d.get('gain'))} | "
                f"{_num(d.get('branch_response'))} | {d['r2_entropy']:.3f} | {_num(d.get('r2_chance'))} | "
                f"{d['r2_qerr']:.3f} | {d['n']} |")
        for bits, verdict in (out.get("verdicts_dependency") or {}).items():
            lines += ["", f"- {bits}: {verdict}"]
    return "\n".join(lines) + "\n"
