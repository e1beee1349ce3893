"""``python -m qvlm bench``: FP and every recipe at W8A8, W6A6, W4A4 (and W3A3 when needed), one harness.

Writes ``bench.json`` and ``bench.md`` to the output folder after every run (a long bench that is
interrupted keeps what it measured). Besides accuracy it measures the timing targets (full ``qvlm``
recipe time; CDM search vs the layer-wise greedy search on the same grid) and the dependency
diagnostics per decoder pair. Every verdict in the Markdown is computed from the numbers.

:func:`quantize_and_evaluate` is the one quantize -> evaluate loop: the bench, the bit sweep
(:func:`qvlm.evaluation.compare.bit_sweep`), ``benchmarks/paired_runs.py`` and
``benchmarks/llava_gpu.py`` all measure their rows with it, so their rows compare.

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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qvlm.data import QUESTION_TYPES, get_task
from qvlm.evaluation.accuracy import EvalResult, evaluate
from qvlm.evaluation.analysis import PairSummary
from qvlm.evaluation.reference import BNB_NF4, BNB_NF4_LABEL, load_bnb_nf4
from qvlm.quant import RECIPES, QuantConfig
from qvlm.quant import quantize as core_quantize
from qvlm.quant.integer import use_integer_kernels
from qvlm.utils.progress import ProgressCallback
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


# ----------------------------------------------------------------------------------------------
# one row: quantize, evaluate
# ----------------------------------------------------------------------------------------------
def evaluation_fields(ev: EvalResult) -> dict:
    """The accuracy columns of a row, with per-question correctness for McNemar's test."""
    return {"accuracy": ev.accuracy, "per_type": ev.per_type, "n": ev.n, "eval_seconds": round(ev.seconds, 2),
            "answers_per_second": round(ev.answers_per_second, 1), "kernels": ev.kernels,
            "correct": [bool(p["correct"]) for p in ev.predictions]}


def quantization_fields(result) -> dict:
    """What a bench row keeps of a :class:`~qvlm.quant.QuantResult`: stage seconds, errors, CDM's choices."""
    return {
        "calibration_s": round(result.seconds("calibration"), 3),
        "search_s": round(result.seconds(*SEARCH_STAGES), 3),
        "timings": result.timings,
        "output_mse": result.output_mse,
        "blocks": result.blocks,
        "entropies": result.entropies,
        "h0": result.h0,
        "percentiles": {str(k): v for k, v in result.percentiles.items()},
        "veo_final_loss": result.veo_losses[-1].to_dict() if result.veo_losses else None,
        "search": [r.to_dict() for r in result.search],
        "veo_holdout": [r.to_dict() for r in result.veo_holdout],
    }


def quantize_and_evaluate(
    handle: Any,
    config: QuantConfig,
    samples: Sequence,
    *,
    batch_size: int = 64,
    describe: Callable[[Any], dict] | None = None,
    quantize: Callable[..., Any] | None = None,
    calibration: Sequence | None = None,
    score: Callable[[str, object], float] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """Quantize ``handle`` by ``config``, answer ``samples`` with the quantized copy, drop it: one row.

    Row: ``{"bits", "recipe", "calib_size", "quantize_s"}`` and :func:`evaluation_fields`, plus
    ``describe(result)``, read before answering, while the quantized copy is still packed (timings, memory).
    The copy then answers on integer kernels where its formats allow (:func:`use_integer_kernels`; the
    row's ``kernels`` says which path answered).
    ``progress`` hears the quantization's stages, then evaluation's ``STAGE_EVAL``; ``cancel``
    stops either. ``quantize`` defaults to :func:`qvlm.quant.quantize` (a test passes a stand-in);
    ``calibration`` replaces the task's calibration pairs, ``score`` its exact-match scoring
    (:attr:`qvlm.data.Task.score`). Holding one quantized copy at a time is why the copy is dropped here.
    """
    quantize = quantize or core_quantize
    options: dict[str, Any] = {"cancel": cancel}  # only what was given, so a stand-in needs no more
    if progress is not None:
        options["progress"] = progress
    if calibration is not None:
        options["calibration"] = calibration
    start = time.perf_counter()
    result = quantize(handle, config, **options)
    seconds = time.perf_counter() - start
    described = describe(result) if describe is not None else {}
    use_integer_kernels(result.handle)
    ev = evaluate(result.handle.model, result.handle.processor, list(samples), batch_size=batch_size,
                  progress=progress, cancel=cancel, score=score)
    row = {"bits": config.bits_label, "recipe": config.recipe, "calib_size": config.calib_size,
           "quantize_s": round(seconds, 3), **evaluation_fields(ev), **described}
    del result
    gc.collect()
    return row


# ----------------------------------------------------------------------------------------------
# the bench: its steps, in the order run_bench calls them
# ----------------------------------------------------------------------------------------------
def run_bench(opts: BenchOptions) -> dict:
    """Measure everything ``opts`` asks for on ``opts.model``; the report is saved after every row."""
    from qvlm.models import load_vlm

    torch.manual_seed(0)
    handle = load_vlm(opts.model)
    bench = _Bench(handle, get_task(handle.task).evaluation_subset(opts.limit), opts)
    fp_accuracy = bench.measure_references()
    bench.measure_recipes(fp_accuracy)
    bench.measure_variants()
    if opts.timing_baseline:
        bench.measure_timing()
    if opts.ded:
        bench.measure_dependency()
    bench.out["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bench.save()
    return bench.out


class _Bench:
    """One bench run: the FP model, the evaluated questions and the report that grows row by row."""

    def __init__(self, handle: Any, samples: list, opts: BenchOptions) -> None:
        self.handle, self.samples, self.opts = handle, samples, opts
        self.out = {
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

    def save(self) -> None:
        (self.opts.out_dir / "bench.json").write_text(json.dumps(self.out, indent=2, default=str))
        (self.opts.out_dir / "bench.md").write_text(render_markdown(self.out))

    def add_unquantized(self, bits: str, recipe: str, model_handle: Any) -> dict:
        """A row for a model evaluated as it is (FP, a reference), saved at once."""
        ev = evaluate(model_handle.model, model_handle.processor, self.samples, batch_size=self.opts.batch_size)
        row = {"bits": bits, "recipe": recipe, "calib_size": None, **evaluation_fields(ev)}
        if recipe == BNB_NF4:  # bitsandbytes' Linear4bit: neither of the project's paths
            row["kernels"] = "bitsandbytes"
        self.out["rows"].append(row)
        self.save()
        return row

    def measure(self, bits: str, recipe: str, calib_size: int, overrides: dict | None = None) -> dict:
        """One quantized row appended to the report, which is saved at once."""
        cfg = QuantConfig.from_bits(bits, recipe=recipe, calib_size=calib_size, **(overrides or {}))
        row = quantize_and_evaluate(self.handle, cfg, self.samples, batch_size=self.opts.batch_size,
                                    describe=quantization_fields)
        if overrides:
            row["overrides"] = dict(overrides)
        self.out["rows"].append(row)
        extra = f" {dict(overrides)}" if overrides else ""
        self.opts.log(f"{bits} {recipe:9s}{extra} calib {calib_size}: acc {row['accuracy']:.4f}  quantize "
                      f"{row['quantize_s']:.1f} s (calibration {row['calibration_s']:.1f} s, search "
                      f"{row['search_s']:.1f} s), answered on {row['kernels']}")
        self.save()
        return row

    def measure_references(self) -> float:
        """FP and the reference rows (bnb-nf4 as W4A16); returns FP's accuracy."""
        self.opts.log(f"FP on {len(self.samples)} questions")
        fp = self.add_unquantized("FP", "fp", self.handle)
        if BNB_NF4 in self.opts.references:
            self.opts.log(f"{BNB_NF4_LABEL} on {len(self.samples)} questions")
            self.add_unquantized("W4A16", BNB_NF4, load_bnb_nf4(self.opts.model))
            gc.collect()
        return fp["accuracy"]

    def measure_recipes(self, fp_accuracy: float) -> None:
        """Every recipe at every bit setting; W3A3 joins when asked, or when W4A4 shows no gap to FP."""
        opts = self.opts
        bits_list = list(opts.bits)
        done_bits: set[str] = set()
        while bits_list:
            bits = bits_list.pop(0)
            done_bits.add(bits)
            for recipe in opts.recipes:
                self.measure(bits, recipe, opts.calib_size)
            if bits == "W4A4" and "W3A3" not in done_bits and "W3A3" not in bits_list:
                w4 = [r for r in self.out["rows"] if r["bits"] == "W4A4"]
                no_gap = all(abs(r["accuracy"] - fp_accuracy) <= 0.01 for r in w4)
                if opts.w3a3 == "yes" or (opts.w3a3 == "auto" and no_gap):
                    self.out["notes"].append("W3A3 added: " + ("requested." if opts.w3a3 == "yes" else
                                             "every recipe at W4A4 is within 1 pt of FP, so W4A4 shows no gap."))
                    bits_list.append("W3A3")

    def measure_variants(self) -> None:
        """The config variants, then the calibration-size sweep."""
        opts = self.opts
        for bits, recipe, overrides in opts.variants:
            self.measure(bits, recipe, opts.calib_size, dict(overrides))
        for size in opts.calib_sweep:
            for bits in opts.sweep_bits:
                for recipe in opts.sweep_recipes:
                    self.measure(bits, recipe, size)

    def measure_timing(self) -> None:
        """The timing targets at W4A4: layer-wise greedy search vs CDM (exhaustive, coordinate), full qvlm, qlora."""
        opts, handle = self.opts, self.handle
        opts.log("timing: layer-wise greedy search (max_block_depth=1) vs CDM, full qvlm, qlora at W4A4")

        def best_of(**kw):
            runs = [core_quantize(handle, QuantConfig.from_bits("W4A4", calib_size=opts.calib_size, **kw))
                    for _ in range(max(1, opts.timing_repeats))]
            return min(runs, key=lambda r: r.seconds("total"))

        greedy = best_of(recipe="qvlm-cdm", max_block_depth=1)
        cdm = best_of(recipe="qvlm-cdm", joint_search="exhaustive")
        coord = best_of(recipe="qvlm-cdm", joint_search="coordinate")
        full = best_of(recipe="qvlm")
        qlora = best_of(recipe="qlora")

        def tables_s(r) -> float:  # the quantized pass + percentile tables, without Eqs. 4-5
            return r.seconds("entropy") - r.seconds("entropy_eq45")

        self.out["timing"] = {
            "repeats": opts.timing_repeats,
            "layerwise_search_s": greedy.seconds("search"),
            "layerwise_tables_s": tables_s(greedy),
            "cdm_search_s": cdm.seconds("search"),
            "cdm_entropy_s": cdm.seconds("entropy"),
            "cdm_entropy_eq45_s": cdm.seconds("entropy_eq45"),
            "cdm_blocks": cdm.blocks,
            "cdm_layer_passes": sum(s.layer_passes for s in cdm.search),
            "layerwise_layer_passes": sum(s.layer_passes for s in greedy.search),
            "cdm_coordinate_search_s": coord.seconds("search"),
            "cdm_coordinate_entropy_s": coord.seconds("entropy"),
            "cdm_coordinate_layer_passes": sum(s.layer_passes for s in coord.search),
            "cdm_coordinate_output_mse": coord.output_mse,
            "cdm_exhaustive_output_mse": cdm.output_mse,
            "layerwise_output_mse": greedy.output_mse,
            "qvlm_total_s": full.seconds("total"),
            "qvlm_timings": full.timings,
            "qlora_total_s": qlora.seconds("total"),
            "qvlm_cdm_total_s": cdm.seconds("total"),
        }
        del greedy, cdm, full, qlora, coord
        gc.collect()
        self.save()

    def measure_dependency(self) -> None:
        """DED and the dependency diagnostics of every decoder pair at each of ``opts.ded_bits``."""
        from qvlm.evaluation.analysis import dependency_diagnostics

        opts = self.opts
        for bits in opts.ded_bits:
            opts.log(f"DED and dependency diagnostics at {bits}, every decoder pair, {opts.ded_samples} samples")
            report = dependency_diagnostics(
                self.handle, QuantConfig.from_bits(bits, recipe="qvlm-cdm", calib_size=opts.ded_samples),
                n_samples=opts.ded_samples)
            self.out["ded"] += [{"bits": bits, **row} for row in report.to_dict()["pairs"]]
            self.out.setdefault("verdicts_dependency", {})[bits] = report.verdict
            self.save()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


@dataclass(frozen=True)
class BenchRow:
    """One stored bench row, as :func:`render_markdown` and the verdicts read it.

    Written as a plain dict (the saved form, which an interrupted bench resumes from); a field that an
    older file or a reference row lacks reads as not measured (None), never as a made-up number.
    """

    bits: str
    recipe: str
    accuracy: float
    per_type: dict[str, float] = field(default_factory=dict)
    n: int | None = None
    correct: list[bool] | None = None
    calib_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    calibration_s: float | None = None
    search_s: float | None = None
    quantize_s: float | None = None
    answers_per_second: float | None = None
    kernels: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchRow":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None})

    @property
    def label(self) -> str:
        """The recipe as the table names it, with its overrides."""
        if self.recipe == BNB_NF4:
            return BNB_NF4_LABEL
        return self.recipe + (f" ({_overrides(self)})" if self.overrides else "")


@dataclass(frozen=True)
class BenchReport:
    """A stored bench run (``bench.json``) as the markdown reads it: the rows and what the run also measured."""

    model: str
    eval_questions: int
    calib_size: int
    machine: dict[str, Any]
    started: str
    rows: list[BenchRow]
    task: str = "easy-vqa"  # runs stored before the task was recorded were all easy-VQA
    limit: int | None = None
    finished: str | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    ded: list[dict[str, Any]] = field(default_factory=list)
    verdicts_dependency: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        return cls(**known | {"rows": [BenchRow.from_dict(r) for r in d["rows"]]})


def _overrides(row: BenchRow) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.overrides.items())


def _find(rows: list[BenchRow], bits: str, recipe: str) -> BenchRow | None:
    return next((r for r in rows if r.bits == bits and r.recipe == recipe), None)


def paired_verdicts(rows: list[BenchRow], bits: str, baselines: tuple[str, ...] = ("qlora", "rtn")) -> list[str]:
    """Every recipe at ``bits`` against each baseline by McNemar's test on the same questions."""
    lines = []
    for base in baselines:
        b = _find(rows, bits, base)
        if b is None or b.correct is None:
            continue
        for r in rows:
            if r.bits != bits or r.recipe == base or r.correct is None or len(r.correct) != len(b.correct):
                continue
            test = mcnemar(r.correct, b.correct)
            lines.append(f"{bits}: {paired_verdict(r.recipe, base, test)}; {_pct(r.accuracy)} vs {_pct(b.accuracy)}.")
    return lines


def _dash(x: Any) -> str:
    return "–" if x is None else str(x)


def reference_verdicts(rows: list[BenchRow], reference: str = BNB_NF4) -> list[str]:
    """The reference row against FP, and every W4A4 recipe against the reference (McNemar, same questions)."""
    ref = next((r for r in rows if r.recipe == reference and r.correct is not None), None)
    if ref is None:
        return []
    lines = []
    others = [r for r in rows if (r.bits == "W4A4" or r.recipe == "fp") and r.correct is not None
              and len(r.correct) == len(ref.correct)]
    for r in others:
        test = mcnemar(r.correct, ref.correct)
        lines.append(f"{r.bits} vs {reference} ({ref.bits}): {paired_verdict(r.recipe, reference, test)}; "
                     f"{_pct(r.accuracy)} vs {_pct(ref.accuracy)}, {_dash(r.answers_per_second)} vs "
                     f"{_dash(ref.answers_per_second)} answers/s.")
    return lines


def verdicts(report: BenchReport) -> list[str]:
    """The accuracy and timing targets, each judged from the measured rows."""
    rows = [r for r in report.rows if r.calib_size in (None, report.calib_size) and not r.overrides]
    fp = _find(rows, "FP", "fp")
    if fp is None:
        return []
    acc = fp.accuracy
    lines = []
    for bits, tol in (("W8A8", 0.002), ("W6A6", 0.005)):
        gaps = {r.recipe: acc - r.accuracy for r in rows if r.bits == bits}
        if gaps:
            worst = max(gaps.values())
            ok = [k for k, g in gaps.items() if g <= tol]
            qvlm = f"{100 * gaps['qvlm']:.2f}" if "qvlm" in gaps else "nan"
            lines.append(f"{bits} within {100 * tol:.1f} pt of FP: {len(ok)}/{len(gaps)} recipes "
                         f"(largest drop {100 * worst:.2f} pt, {max(gaps, key=gaps.get)}); "
                         f"qvlm drop {qvlm} pt.")
    for bits in ("W4A4", "W4A3", "W3A3"):
        lines += paired_verdicts(rows, bits)
    lines += reference_verdicts(rows)
    for r in report.rows:
        if r.overrides:
            lines.append(f"{r.bits} {r.recipe} with {_overrides(r)}: {100 * (r.accuracy - acc):+.2f} pt vs FP.")
        elif r.calib_size not in (None, report.calib_size):
            lines.append(f"{r.bits} {r.recipe} with {r.calib_size} calibration pairs: "
                         f"{100 * (r.accuracy - acc):+.2f} pt vs FP.")
    t = report.timing
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
    """``bench.md`` from a bench run's stored form (``bench.json``)."""
    report = BenchReport.from_dict(out)
    rows = report.rows
    fp = _find(rows, "FP", "fp")
    limit = report.limit
    types_present = [t for t in QUESTION_TYPES if any(t in r.per_type for r in rows)]  # the model's task only
    task = report.task
    machine = report.machine
    lines = [
        f"# Q-VLM bench: {report.model}",
        "",
        f"- Evaluation: {report.eval_questions} {get_task(task).title or task} test questions "
        f"({'full test split' if limit is None else f'fixed random subset, --limit {limit}'}), greedy decoding.",
        f"- Calibration: {report.calib_size} train-split pairs (batch 8). Machine: {machine['cpus']} CPUs, "
        f"torch {machine['torch']}, {machine['torch_threads']} threads, device {machine['device']}.",
        f"- Started {report.started}" + (f", finished {report.finished}." if report.finished else " (running)."),
        "- Search s = layer-wise init + VEO + entropy + block search; calibration s = batches, model copy, "
        "first-layer capture.",
        "",
        "| Bits | Recipe | Calib. pairs | Accuracy | Δ vs FP (pt) | " + " | ".join(types_present)
        + " | Calib. s | Search s | Quantize s | Answers/s | Kernels |",
        "|---|---|---|---|---|" + "---|" * len(types_present) + "---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if fp is None or r is fp else f"{100 * (r.accuracy - fp.accuracy):+.2f}"
        types = " | ".join(_pct(r.per_type.get(t)) for t in types_present)
        lines.append(f"| {r.bits} | {r.label} | {r.calib_size or '–'} | {_pct(r.accuracy)} | {delta} | {types} | "
                     f"{_dash(r.calibration_s)} | {_dash(r.search_s)} | {_dash(r.quantize_s)} | "
                     f"{_dash(r.answers_per_second)} | {_dash(r.kernels)} |")
    v = verdicts(report)
    if v:
        lines += ["", "## Targets (computed from the table)", ""] + [f"- {x}" for x in v]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report.notes]
    if report.timing:
        lines += ["", "## Timing detail (W4A4)", "", "```", json.dumps(report.timing, indent=1, default=str), "```"]
    if report.ded:
        lines += ["", "## Do the decoder layers interact? (layer-wise init, per calibration sample)", "",
                  "Interaction share: the part of a pair's block-error variance over the candidate grid that an "
                  "additive model leaves (0 = the errors add up). R² chance: what R² exceeds one time in twenty "
                  "with no correlation at all for n samples.", "",
                  "| Bits | Pair | interaction share | joint = greedy | DED = 0 | DED / controllable | controllable "
                  "share | gain | branch | R² entropy→DED | R² chance (5%) | R² qerr→DED | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report.ded:
            d = PairSummary.from_dict(row)
            lines.append(
                f"| {row['bits']} | {d.layer}–{d.layer + 1} | {_share(d.interaction_share)} | "
                f"{'yes' if d.joint_equals_greedy else 'no'} | {_share(d.zero_ded_fraction)} | "
                f"{_num(d.ded_relative)} | {_share(d.controllable_share)} | {_num(d.gain)} | "
                f"{_num(d.branch_response)} | {d.r2_entropy:.3f} | {_num(d.r2_chance)} | "
                f"{d.r2_qerr:.3f} | {d.n} |")
        for bits, verdict in report.verdicts_dependency.items():
            lines += ["", f"- {bits}: {verdict}"]
    return "\n".join(lines) + "\n"
