"""Command line: ``python -m qvlm eval | quantize | diagnose | bench``.

Re-training the bundled models is a separate tool: ``python -m training tiny | mosaic`` (``training/``).

Every command reports bad input as one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_eval(args: argparse.Namespace) -> int:
    from qvlm.data import get_task
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.export import load_model

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    handle = load_model(args.model)
    samples = get_task(handle.task).evaluation_subset(args.limit)
    with _progress_bar("eval") as progress:
        result = evaluate(handle.model, handle.processor, samples, batch_size=args.batch_size, progress=progress)
    print(format_eval(handle.name, result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": handle.name, **result.to_dict()}, indent=2))
    return 0


def format_eval(name: str, result) -> str:
    lines = [f"model: {name}", f"accuracy: {result.accuracy:.4f} on {result.n} test questions"]
    for qtype, acc in result.per_type.items():
        lines.append(f"  {qtype:7s} {acc:.4f} ({result.counts[qtype]} questions)")
    lines.append(f"answers/second: {result.answers_per_second:.1f} ({result.seconds:.1f} s)")
    return "\n".join(lines)


class _progress_bar:
    """A tqdm bar driven by the core's ``(stage, fraction, message)`` callback."""

    def __init__(self, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=1000, desc=desc, unit="‰", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __enter__(self):
        def progress(stage: str, fraction: float, message: str) -> None:
            self.bar.set_description(stage)
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(message)
            self.bar.refresh()

        return progress

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qvlm.data import get_task
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.export import load_model
    from qvlm.quant import QuantConfig, quantize

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    overrides = {}
    if args.config is not None:
        overrides = QuantConfig.from_json(args.config.read_text()).to_dict()
        for key in ("recipe", "w_bits", "a_bits"):
            overrides.pop(key, None)
    if args.calib_size is not None:
        overrides["calib_size"] = args.calib_size
    cfg = QuantConfig.from_bits(args.bits, recipe=args.method, **overrides)
    if args.save is not None:
        from qvlm.export import export_refusal

        refusal = export_refusal(cfg, args.format)
        if refusal:
            raise ValueError(refusal)
    handle = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.to_json())
    with _progress_bar("quantize") as progress:
        result = quantize(handle, cfg, progress=progress)
    (args.out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    if args.save is not None:
        from qvlm.export import save_quantized
        from qvlm.quant.memory import weight_memory

        save_quantized(result.handle, args.save, cfg.to_dict(), result.to_dict(), format=args.format)
        mem = weight_memory(result.handle.model)
        reload = ("LlavaForConditionalGeneration.from_pretrained (transformers + compressed-tensors)"
                  if args.format == "compressed-tensors" else "qvlm.load_quantized")
        print(f"saved the packed model ({args.format}) to {args.save} (weights: {mem['quant_bytes']:,} bytes packed "
              f"vs {mem['fp16_bytes']:,} in FP16); reload with {reload}")
    t = result.timings
    print(f"{handle.name}: {cfg.recipe} {cfg.bits_label} in {t.get('total', 0.0):.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in t.items() if k != 'total')})")
    if result.blocks and result.entropies:
        print(f"blocks: {result.blocks}  h0 = {result.h0:.4f}")
    if args.eval:
        samples = get_task(handle.task).evaluation_subset(args.limit)
        with _progress_bar("eval") as progress:
            ev = evaluate(result.handle.model, result.handle.processor, samples, batch_size=args.batch_size,
                          progress=progress)
        print(format_eval(result.handle.name, ev))
        (args.out / "eval.json").write_text(json.dumps({"model": result.handle.name, "config": cfg.to_dict(),
                                                        "limit": args.limit, **ev.to_dict()}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from qvlm.evaluation.bench import BenchOptions, run_bench
    from qvlm.quant import RECIPES, QuantConfig

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    bits = tuple(b.strip().upper() for b in args.bits.split(",") if b.strip())
    for b in bits:
        QuantConfig.from_bits(b)  # validates the spelling
    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip()) if args.recipes else \
        tuple(r for r in RECIPES if r != "fp")
    for r in recipes:
        if r not in RECIPES or r == "fp":
            raise ValueError(f"unknown recipe {r!r} for --recipes; choose from {', '.join(RECIPES[1:])}")
    opts = BenchOptions(model=args.model, bits=bits, recipes=recipes, limit=args.limit, calib_size=args.calib_size,
                        batch_size=args.batch_size, w3a3=args.w3a3, ded=not args.no_ded,
                        ded_samples=args.ded_samples, timing_baseline=not args.no_timing, out_dir=args.out,
                        timing_repeats=args.timing_repeats,
                        calib_sweep=tuple(int(x) for x in args.calib_sweep.split(",") if x.strip()))
    run_bench(opts)
    print(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


def _add_quant_commands(sub) -> None:
    """The ``quantize`` and ``bench`` subcommands (quantization core, issue 3)."""
    p = sub.add_parser("quantize", help="quantize a model with one recipe; save config, statistics (and accuracy)")
    p.add_argument("--model", default="bundled", help="model folder, hub id, 'bundled' (default: the easy-VQA model) or 'mosaic' (the mosaic model)")
    p.add_argument("--bits", default="w4a4", help="weight/activation bits, e.g. w4a4, W6A6, w8a8")
    p.add_argument("--method", default="qvlm", help="recipe: fp, rtn, qlora, awq, qvlm-cdm, qvlm-veo, qvlm")
    p.add_argument("--config", type=Path, default=None, help="a QuantConfig JSON file for the other parameters")
    p.add_argument("--calib-size", type=int, default=None, help="calibration pairs (default 64)")
    p.add_argument("--eval", action="store_true", help="also measure easy-VQA test accuracy")
    p.add_argument("--limit", type=int, default=None, help="with --eval: a fixed random subset of N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, type=Path, help="folder for config.json, result.json, eval.json")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the packed quantized model (safetensors + JSON) to this folder")
    p.add_argument("--format", choices=("qvlm-packed", "compressed-tensors"), default="qvlm-packed",
                   help="format of --save: the project's packed layout, or compressed-tensors (uniform weights; "
                        "loads in plain transformers)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("diagnose", help="do the decoder layers interact? dependency diagnostics -> the model "
                                         "folder's dependency_report.json (shown in the Analysis tab)")
    p.add_argument("--model", default="bundled", help="'bundled', 'mosaic', a model folder or a hub id")
    p.add_argument("--bits", default="W4A3", help="comma-separated bit settings (default W4A3)")
    p.add_argument("--method", default="qvlm-cdm", help="the recipe whose ranges and search are diagnosed")
    p.add_argument("--samples", type=int, default=16, help="calibration samples per pair (default 16)")
    p.add_argument("--out", type=Path, default=None, help="report file (default: MODEL/dependency_report.json)")
    p.add_argument("--fp-vision", action="store_true", help="keep the vision tower in full precision: the "
                   "language model's layers alone (stored as e.g. 'W4A3 vision FP')")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("bench", help="FP and every recipe at W8A8/W6A6/W4A4 -> benchmarks/results/bench.{md,json}")
    p.add_argument("--model", default="bundled")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N test questions")
    p.add_argument("--bits", default="W8A8,W6A6,W4A4", help="comma-separated bit settings")
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: all but fp)")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--w3a3", choices=("auto", "yes", "no"), default="auto",
                   help="add W3A3 (auto: only if W4A4 shows no gap to FP)")
    p.add_argument("--no-ded", action="store_true", help="skip the entropy-vs-DED R^2 analysis")
    p.add_argument("--ded-samples", type=int, default=64)
    p.add_argument("--no-timing", action="store_true", help="skip the timing-target runs")
    p.add_argument("--timing-repeats", type=int, default=2, help="best-of-N for the timing-target runs")
    p.add_argument("--calib-sweep", default="256",
                   help="extra calibration sizes for rtn/qvlm at W8A8 and W4A4 (comma list; empty to skip)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="easy-VQA test accuracy of a model (overall and per question type)")
    p.add_argument("--model", default="bundled", help="model folder, hub id, 'bundled' (default: the easy-VQA model) or 'mosaic' (the mosaic model)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    p.set_defaults(func=_cmd_eval)
    _add_quant_commands(sub)
    return parser


def _cmd_diagnose(args: argparse.Namespace) -> int:
    import time

    from qvlm.evaluation.analysis import DEPENDENCY_REPORT, dependency_diagnostics, store_dependency_report
    from qvlm.models import load_vlm
    from qvlm.quant import QuantConfig

    if args.samples < 2:
        raise ValueError("--samples must be at least 2")
    bits = [b.strip().upper() for b in args.bits.split(",") if b.strip()]
    # validates before loading; with --fp-vision the language model's own interaction, stored apart
    configs = {(f"{b} vision FP" if args.fp_vision else b): QuantConfig.from_bits(
        b, recipe=args.method, quantize_vision=not args.fp_vision) for b in bits}
    handle = load_vlm(args.model)
    out = args.out
    if out is None:
        if handle.source == "hub":
            raise ValueError("a hub model has no folder to store the report in: pass --out FILE")
        out = Path(args.model if handle.source == "local" else _bundled_folder(handle.name)) / DEPENDENCY_REPORT
    for b, cfg in configs.items():
        start = time.perf_counter()
        with _progress_bar(f"diagnose {b}") as progress:
            report = dependency_diagnostics(handle, cfg, n_samples=args.samples, progress=progress)
        store_dependency_report(out, b, report, model=handle.name, task=handle.task, recipe=args.method,
                                samples=args.samples, seconds=round(time.perf_counter() - start, 1))
        shares = [p.interaction_share for p in report.pairs]
        print(f"{b}: interaction share per pair {', '.join(f'{100 * s:.1f}%' for s in shares if s is not None)}")
        print(f"{b}: {report.verdict}")
    print(f"wrote {out}")
    return 0


def _bundled_folder(name: str) -> Path:
    from qvlm.models import BUNDLED_MODELS

    return BUNDLED_MODELS[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
