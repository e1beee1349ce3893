"""Downloads checked where they land: each format's bytes (files, memory after the documented load and while
answering) and its answers on the full test split, against the variant it was saved from.

    python benchmarks/export_check.py --model bundled --runs '[["W4A4", "rtn", {}], ["W4A4", "qvlm", {}]]' \\
        --out benchmarks/results/exports/easy

For each run: quantize (calibration pairs of the model's own train split), answer the questions as the variant
in this process (its simulated self) and as its W?A16 counterpart (activation quantization off), then for every
format that can hold the variant (:func:`qvlm.export.export_refusal`): save, measure
(:func:`qvlm.export.sizes.measure_export`), load as a user would (``qvlm.load_quantized`` for qvlm-packed, plain
``from_pretrained`` for the others) and answer the same questions. Each reload is compared with the variant
(packed: identical answers expected) and with the W?A16 counterpart (plain formats apply weights only), by
identical answers and McNemar's exact test. Writes ``OUT.json`` and ``OUT.md`` after every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qvlm.data import get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.export import FORMAT_NAME, SAVE_FORMATS, export_refusal, load_quantized, save_quantized
from qvlm.export.sizes import measure_export, model_folder, plain_load
from qvlm.models.loader import load_vlm
from qvlm.quant import QuantConfig, quantize
from qvlm.quant.kernels import cpu_kind
from qvlm.quant.memory import fp16_bytes
from qvlm.utils.stats import mcnemar


def answer(model, processor, samples) -> list[dict]:
    return evaluate(model, processor, samples, batch_size=32).predictions


def compare(a: list[dict], b: list[dict]) -> dict:
    """Identical answers and McNemar's test of ``a`` against ``b`` (same questions, same order)."""
    test = mcnemar([p["correct"] for p in a], [p["correct"] for p in b])
    return {"identical": sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)), **test}


def accuracy(predictions: list[dict]) -> float:
    return 100 * sum(p["correct"] for p in predictions) / len(predictions)


def without_activation_quantization(model) -> None:
    for m in model.modules():
        act = getattr(m, "act", None)
        if isinstance(act, torch.nn.Module) and hasattr(act, "enabled"):
            act.enabled = False


def check_run(handle, model_name: str, samples, bits: str, recipe: str, overrides: dict, calib: int,
              rotated_tower: str = "nf4", formats: tuple[str, ...] = SAVE_FORMATS) -> dict:
    config = QuantConfig.from_bits(bits, recipe=recipe, **{"calib_size": calib, **overrides})
    result = quantize(handle, config)
    variant = answer(result.handle.model, result.handle.processor, samples)
    row = {"bits": bits, "recipe": recipe, "overrides": overrides, "calib_size": calib,
           "variant_accuracy": accuracy(variant), "fp16_bytes": fp16_bytes(handle.model), "formats": {},
           "rotated_tower": rotated_tower}
    reloads: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            refusal = export_refusal(config, fmt)
            if refusal:
                row["formats"][fmt] = {"refused": refusal}
                continue
            folder = save_quantized(result.handle, Path(tmp) / fmt, config.to_dict(), result.to_dict(), format=fmt,
                                    rotated_tower=rotated_tower)
            sizes = measure_export(folder, fmt != FORMAT_NAME, handle.model, model_folder(model_name))
            if fmt == FORMAT_NAME:
                loaded = load_quantized(folder, device="cpu")
                model, processor, path = loaded.model, loaded.processor, loaded.execution_path
            else:
                (model, processor), path = plain_load(folder), "plain from_pretrained"
            reloaded = answer(model, processor, samples)
            row["formats"][fmt] = {"sentence": sizes.sentence(), "files": sizes.files,
                                   "weight_files": sizes.weight_files, "fp_files": sizes.fp_files,
                                   "loaded": sizes.loaded, "answering": sizes.answering, "path": path,
                                   "accuracy": accuracy(reloaded), "vs_variant": compare(reloaded, variant)}
            reloads[fmt] = reloaded
            del model, processor
    without_activation_quantization(result.handle.model)
    weights_only = answer(result.handle.model, result.handle.processor, samples)
    row["weights_only_accuracy"] = accuracy(weights_only)
    for fmt, reloaded in reloads.items():
        row["formats"][fmt]["vs_weights_only"] = compare(reloaded, weights_only)
    return row


def render(rows: list[dict], title: str, n: int, machine: str) -> str:
    lines = [f"# {title}", "", f"{n} test questions per row. Machine: {machine}.", "",
             "| Bits | Recipe | Config | Format | Files (du -b) | Weight files, % of FP16 file | After load, % of FP16 "
             "| While answering | Accuracy (variant / W?A16 / reloaded) | Identical to variant | vs W?A16: identical, p |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "recommended"
        if r.get("rotated_tower", "float") != "float":
            config += f"; rotated tower {r['rotated_tower']}"
        for fmt, e in r["formats"].items():
            if "refused" in e:
                lines.append(f"| {r['bits']} | {r['recipe']} | {config} | {fmt} | refused: {e['refused']} "
                             "| | | | | | |")
                continue
            share = f"{100 * e['weight_files'] / e['fp_files']:.0f}%" if e["fp_files"] else "–"
            w = e["vs_weights_only"]
            lines.append(
                f"| {r['bits']} | {r['recipe']} | {config} | {fmt} | {e['files']:,} | {e['weight_files']:,} ({share}) "
                f"| {e['loaded']:,} ({100 * e['loaded'] / r['fp16_bytes']:.0f}%) "
                f"| {e['answering']:,} ({100 * e['answering'] / r['fp16_bytes']:.0f}%) "
                f"| {r['variant_accuracy']:.2f} / {r['weights_only_accuracy']:.2f} / {e['accuracy']:.2f} "
                f"| {e['vs_variant']['identical']:,} | {w['identical']:,}, p = {w['p']:.3g} |")
    lines += ["", "FP16 model in memory: " + ", ".join(sorted({f"{r['fp16_bytes']:,} bytes" for r in rows})) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--runs", required=True, help='JSON list of [bits, recipe, {config overrides}]')
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="a fixed subset of the test split (default: all of it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rotated-tower", default="nf4", choices=("nf4", "float"),
                   help="how the bitsandbytes export writes a rotated vision tower (qvlm.export.bitsandbytes.ROTATED_TOWER)")
    p.add_argument("--formats", default=",".join(SAVE_FORMATS), help="comma-separated formats to check")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="Exports checked where they land")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_vlm(args.model, device="cpu")
    samples = get_task(handle.task).evaluation_subset(args.limit)
    machine = (f"{platform.processor() or platform.machine()}, CPU kind {cpu_kind()}, {args.threads} torch "
               f"thread(s), torch {torch.__version__}")
    rows = []
    for bits, recipe, overrides in json.loads(args.runs):
        rows.append(check_run(handle, args.model, samples, bits, recipe, overrides, args.calib_size,
                              args.rotated_tower, tuple(args.formats.split(","))))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(render(rows, args.title, len(samples), machine))
        print(f"{bits} {recipe} {overrides}: done", flush=True)


if __name__ == "__main__":
    main()
