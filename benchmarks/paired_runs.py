"""Recipes and config variants on the same test questions, compared by McNemar's paired test.

    python benchmarks/paired_runs.py --runs '[["W4A3", "qlora", {}], ["W4A3", "qvlm-cdm", {"block_objective": "residual"}]]' \
        --out benchmarks/results/cdm_objectives

Each run quantizes the model (``--model``, default the bundled easy-VQA one; 64 train calibration
pairs of its task unless a run overrides it), answers its task's full test split (or ``--limit`` questions) and stores per-question correctness, so every
run is compared with the baseline run of the same bits (``--baseline``, default qlora) on the same
questions. Runs already in ``OUT.json`` are skipped, so an interrupted measurement resumes.
Writes ``OUT.json`` (rows) and ``OUT.md`` (table with p-values) after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.evaluation.bench import measure_row
from qvlm.data import get_task
from qvlm.models import load_vlm
from qvlm.utils.stats import mcnemar, paired_verdict


def run_key(bits: str, recipe: str, overrides: dict) -> str:
    return f"{bits} {recipe} {json.dumps(overrides, sort_keys=True)}"


def render(rows: list[dict], baseline: str, title: str, task: str = "easy-vqa") -> str:
    """Markdown table: accuracy, questions only this run / only the baseline got right, p, verdict."""
    lines = [f"# {title}", "", f"Every run against `{baseline}` at the same bits, McNemar's exact test on the same "
             f"questions ({rows[0]['n'] if rows else 0} {task} test questions).", "",
             "| Bits | Recipe | Overrides | Accuracy | only this right | only baseline right | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["bits"] == r["bits"] and b["recipe"] == baseline and not b["overrides"]), None)
        if base is None or base is r:
            lines.append(f"| {r['bits']} | {r['recipe']} | {json.dumps(r['overrides'])} | {100 * r['accuracy']:.2f} "
                         f"| | | | baseline |")
            continue
        t = mcnemar(r["correct"], base["correct"])
        verdict = paired_verdict(r["recipe"], baseline, t).split(" (p")[0]
        lines.append(f"| {r['bits']} | {r['recipe']} | {json.dumps(r['overrides'])} | {100 * r['accuracy']:.2f} | "
                     f"{t['a_only']} | {t['b_only']} | {t['p']:.3g} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help='JSON list of [bits, recipe, {config overrides}]')
    p.add_argument("--out", type=Path, required=True, help="path without extension for .json and .md")
    p.add_argument("--baseline", default="qlora")
    p.add_argument("--model", default="bundled", help="'bundled' (easy-VQA), 'mosaic', or a model folder")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--title", default="Paired comparison on the bundled model")
    args = p.parse_args()
    runs = json.loads(args.runs)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    rows = json.loads(json_path.read_text()) if json_path.exists() else []
    done = {run_key(r["bits"], r["recipe"], r["overrides"]) for r in rows}
    handle = load_vlm(args.model)
    samples = get_task(handle.task).evaluation_subset(args.limit)
    for bits, recipe, overrides in runs:
        if run_key(bits, recipe, overrides) in done:
            continue
        config = {k: v for k, v in overrides.items() if k != "calib_size"}
        row = measure_row(handle, samples, bits, recipe, overrides.get("calib_size", 64), config)
        row["overrides"] = overrides
        rows.append(row)
        print(f"{bits} {recipe} {overrides}: {100 * row['accuracy']:.2f}% (quantize {row['quantize_s']:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, default=str))
        md_path.write_text(render(rows, args.baseline, args.title, handle.task))


if __name__ == "__main__":
    main()
