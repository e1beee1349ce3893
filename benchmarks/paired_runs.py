"""Recipes and config variants on the same questions, compared by McNemar's paired test, with their spread.

    python benchmarks/paired_runs.py --model mosaic --split holdout \\
        --runs '[["W4A4", "qlora", {"preset": "paper"}], ["W4A4", "qlora", {}]]' --out benchmarks/results/NAME

Each run quantizes the model (``--model``, default the bundled easy-VQA one; 64 train calibration pairs of its task
unless a run overrides ``calib_size``), answers a fixed question set and stores per-question correctness:

* ``--split test``: the task's test split (or ``--limit`` questions of it): where a default is *confirmed*, once;
* ``--split holdout``: train questions on images that no calibration set (seeds 0-2) and no VEO held-out set uses:
  where defaults are *chosen*, so the test split is never tuned on.

Every run is compared with the baseline run (``--baseline``, default qlora) of the same bits, the same overrides
(preset, ranges, calibration seed) and the same thread count, on the same questions. Rows that differ only by their
calibration seed (``calib_seed``) or thread count are one recipe measured several times: the summary table gives
their mean and spread, and a claim that one recipe beats another is marked as holding on every seed only when it
does. Runs already in ``OUT.json`` are skipped, so an interrupted measurement resumes.
Writes ``OUT.json`` (rows) and ``OUT.md`` (tables) after every run. ``--merge A.json B.json`` joins the rows of other
runs' files into OUT (one table over runs made by several processes), then runs what is still missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qvlm.data import Task, get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.evaluation.bench import evaluation_fields, quantization_fields, quantize_and_evaluate
from qvlm.models import load_vlm
from qvlm.quant import QuantConfig
from qvlm.utils.stats import mcnemar, paired_verdict

SELECTION_SEED = 1000
"""Seed of the held-out selection set; calibration seeds 0-2 and VEO's held-out sets are excluded from it."""
EXCLUDED_SEEDS = (0, 1, 2)


def run_key(bits: str, recipe: str, overrides: dict, threads: int) -> str:
    return f"{bits} {recipe} {json.dumps(overrides, sort_keys=True)} threads={threads}"


def question_set(task: Task, split: str, n: int | None) -> list:
    """The questions every run answers: the test split, or held-out train questions no calibration ever saw."""
    if split == "test":
        return task.evaluation_subset(n)
    seen: set = set()
    for seed in EXCLUDED_SEEDS:  # calibration pairs of every seed used, and VEO's held-out images (seed + 1)
        seen |= {s.image_id for s in task.calibration_split(64, seed)}
        seen |= {s.image_id for s in task.holdout_split(64, set(), seed + 1)}
    return task.holdout_split(n or 1000, seen, SELECTION_SEED)


def _ranges(overrides: dict) -> dict:
    """The overrides that name a configuration, without the calibration seed (a repeat, not another config)."""
    return {k: v for k, v in overrides.items() if k != "calib_seed"}


BASELINE_UNREAD = frozenset({"cdm_accept", "cdm_accept_metric", "cdm_holdout_images"})
"""Config fields only CDM reads: a row that sets them is paired with the baseline run without them (the
baseline recipe, qlora or awq, has no CDM stage, so its run would be the same)."""


def baseline_of(row: dict, rows: list[dict], baseline: str) -> dict | None:
    """The baseline recipe's run with the same bits, overrides (but :data:`BASELINE_UNREAD`) and threads as ``row``."""
    def config(r: dict) -> dict:
        return {k: v for k, v in r["overrides"].items() if k not in BASELINE_UNREAD}

    return next((b for b in rows if b["recipe"] == baseline and b["bits"] == row["bits"]
                 and config(b) == config(row) and b.get("threads") == row.get("threads")), None)


def _label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "defaults"


def paired_table(rows: list[dict], baseline: str) -> list[str]:
    lines = ["| Bits | Recipe | Config | Threads | Accuracy | only this right | only baseline right | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['bits']} | {r['recipe']} | {_label(r['overrides'])} | {r.get('threads', '')} "
                f"| {100 * r['accuracy']:.2f} ")
        base = baseline_of(r, rows, baseline)
        if base is None or base is r:
            lines.append(head + "| | | | baseline |" if base is r else head + "| | | | (no baseline run) |")
            continue
        t = mcnemar(r["correct"], base["correct"])
        verdict = paired_verdict(r["recipe"], baseline, t).split(" (p")[0]
        lines.append(head + f"| {t['a_only']} | {t['b_only']} | {t['p']:.3g} | {verdict} |")
    return lines


def spread_table(rows: list[dict], baseline: str) -> list[str]:
    """One line per (bits, recipe, config): accuracy over seeds and thread counts, and the verdict on every seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['bits']}|{r['recipe']}|{json.dumps(_ranges(r['overrides']), sort_keys=True)}", []).append(r)
    lines = ["| Bits | Recipe | Config | Runs (seed/threads) | Mean | Min | Max | vs baseline on every run |",
             "|---|---|---|---|---|---|---|---|"]
    for members in groups.values():
        accs = [100 * m["accuracy"] for m in members]
        runs = ", ".join(f"{m['overrides'].get('calib_seed', 0)}/{m.get('threads', '?')}" for m in members)
        verdicts = set()
        for m in members:
            base = baseline_of(m, rows, baseline)
            if base is None or base is m:
                continue
            t = mcnemar(m["correct"], base["correct"])
            words = paired_verdict("a", "b", t).split(" (p")[0].removeprefix("a ").removesuffix(" b")
            verdicts.add(f"{words} {baseline}")
        same = ("–" if not verdicts else next(iter(verdicts)) if len(verdicts) == 1
                else "differs between runs: " + "; ".join(sorted(verdicts)))
        first = members[0]
        lines.append(f"| {first['bits']} | {first['recipe']} | {_label(_ranges(first['overrides']))} | {runs} "
                     f"| {statistics.fmean(accs):.2f} | {min(accs):.2f} | {max(accs):.2f} | {same} |")
    return lines


def render(rows: list[dict], baseline: str, title: str, task: str, split: str) -> str:
    where = "test questions" if split == "test" else "held-out train questions (images no calibration set saw)"
    n = rows[0]["n"] if rows else 0
    return "\n".join([
        f"# {title}", "",
        f"{n} {task} {where}; every run against `{baseline}` with the same bits, config and thread count, "
        f"McNemar's exact test on the same questions. Machine: {rows[0].get('machine', '') if rows else ''}.", "",
        *paired_table(rows, baseline), "", "## Spread over calibration seeds and thread counts", "",
        *spread_table(rows, baseline), ""])


def measure(handle, samples, bits: str, recipe: str, overrides: dict) -> dict:
    if recipe == "fp":
        ev = evaluate(handle.model, handle.processor, samples, batch_size=64)
        return {"bits": "FP", "recipe": "fp", "quantize_s": 0.0, **evaluation_fields(ev)}
    config = QuantConfig.from_bits(bits, recipe=recipe, **{"calib_size": 64, **overrides})
    return quantize_and_evaluate(handle, config, samples, describe=quantization_fields)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="[]", help='JSON list of [bits, recipe, {config overrides}] ("preset" allowed)')
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="other OUT.json files whose rows join this table (the first of two rows with one key stays)")
    p.add_argument("--out", type=Path, required=True, help="path without extension for .json and .md")
    p.add_argument("--baseline", default="qlora")
    p.add_argument("--model", default="bundled", help="'bundled' (easy-VQA), 'mosaic', or a model folder")
    p.add_argument("--split", choices=("test", "holdout"), default="test")
    p.add_argument("--limit", type=int, default=None, help="questions (test: a fixed subset; holdout: default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded: the arithmetic order moves results)")
    p.add_argument("--title", default="Paired comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    done = {run_key(r["bits"], r["recipe"], r["overrides"], r.get("threads", 1)) for r in rows}
    for other in args.merge:
        for r in json.loads(other.read_text()):
            key = run_key(r["bits"], r["recipe"], r["overrides"], r.get("threads", 1))
            if key not in done:
                rows.append(r)
                done.add(key)
    if args.merge:
        json_path.write_text(json.dumps(rows, default=str))
        md_path.write_text(render(rows, args.baseline, args.title, rows[0].get("task", args.model) if rows else "",
                                  args.split))
    if not json.loads(args.runs):
        return
    handle = load_vlm(args.model)
    samples = question_set(get_task(handle.task), args.split, args.limit)
    machine = f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {handle.device}"
    for bits, recipe, overrides in json.loads(args.runs):
        if run_key(bits, recipe, overrides, args.threads) in done:
            continue
        row = measure(handle, samples, bits, recipe, overrides)
        row.update(bits=bits, overrides=overrides, threads=args.threads, split=args.split, machine=machine)
        rows.append(row)
        print(f"{bits} {recipe} {overrides} threads={args.threads}: {100 * row['accuracy']:.2f}% "
              f"(quantize {row['quantize_s']:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, default=str))
        md_path.write_text(render(rows, args.baseline, args.title, handle.task, args.split))


if __name__ == "__main__":
    main()
