"""Command line: ``python -m qvlm train-tiny | eval | quantize | bench``.

Every command reports bad input as one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from qvlm.training.train import TrainConfig, train_tiny_llava

    given = {"vision_epochs": args.vision_epochs, "caption_steps": args.caption_steps,
             "align_steps": args.align_steps, "joint_epochs": args.joint_epochs}
    cfg = TrainConfig(
        seed=args.seed,
        max_steps=args.max_steps,
        train_images=args.train_images,
        eval_questions=args.eval_questions,
        threads=args.threads,
        **{k: v for k, v in given.items() if v is not None},
    )
    if args.tiny:
        from qvlm.training.tiny_llava import TinyLlavaSpec

        cfg.spec = TinyLlavaSpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
                                 text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    report = train_tiny_llava(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "train_config"}, indent=2))
    return 0


def _cmd_train_mosaic(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qvlm.training.train_mosaic import MOSAIC_SPEC, SMOKE_SPEC, MosaicTrainConfig, parse_curriculum, \
        train_mosaic_llava

    spec = SMOKE_SPEC if args.tiny else MOSAIC_SPEC
    sizes = {"text_layers": args.text_layers, "text_hidden": args.text_hidden,
             "text_intermediate": args.text_intermediate, "patch_size": args.patch_size}
    spec = replace(spec, **{k: v for k, v in sizes.items() if v is not None})
    steps = {"vision_steps": args.vision_steps, "caption_steps": args.caption_steps,
             "align_steps": args.align_steps, "joint_steps": args.joint_steps,
             "checkpoint_every": args.checkpoint_every}
    given = {k: v for k, v in steps.items() if v is not None}  # None: the config's default
    if args.tiny:  # 2 decoder layers of 32, from random weights: stack once, after the first caption step
        given.update(caption_start_layers=1, caption_stack_at=(1,), language_init=None)
    if args.language_init is not None:
        given["language_init"] = None if args.language_init == "none" else args.language_init
    if args.caption_start_layers is not None:
        given["caption_start_layers"] = args.caption_start_layers or None
    if args.caption_stack_at is not None:
        given["caption_stack_at"] = tuple(int(s) for s in args.caption_stack_at.split(",") if s.strip())
    if args.caption_curriculum is not None:
        given["caption_curriculum"] = parse_curriculum(args.caption_curriculum)
    cfg = MosaicTrainConfig(spec=spec, seed=args.seed, max_steps=args.max_steps, max_minutes=args.max_minutes,
                            eval_questions=args.eval_questions, threads=args.threads, device=args.device, **given)
    report = train_mosaic_llava(args.out, cfg, resume=args.resume)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from qvlm.data import get_task
    from qvlm.eval import evaluate
    from qvlm.export import load_vlm_or_export as load_vlm

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    handle = load_vlm(args.model)
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
    from qvlm.eval import evaluate
    from qvlm.export import load_vlm_or_export as load_vlm
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
    handle = load_vlm(args.model)
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
    from qvlm.bench import BenchOptions, run_bench
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

    p = sub.add_parser("train-tiny", help="train the bundled tiny LLaVA on easy-VQA (CPU, ~35 min on 2 cores)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the model and processor to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-epochs", type=int, default=None, help="stage 1 epochs (default: TrainConfig's)")
    p.add_argument("--caption-steps", type=int, default=None, help="stage 2 steps (default: TrainConfig's)")
    p.add_argument("--align-steps", type=int, default=None, help="stage 3 steps (default: TrainConfig's)")
    p.add_argument("--joint-epochs", type=int, default=None, help="stage 4 epochs (default: TrainConfig's)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the steps of each stage (smoke tests)")
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--eval-questions", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a very small architecture (smoke tests)")
    p.set_defaults(func=_cmd_train_tiny)

    p = sub.add_parser("train-mosaic", help="train the mosaic LLaVA (issue 11) in the background: resumable, logs "
                       "to OUT/train.log, checkpoints in OUT/checkpoints/step-N")
    p.add_argument("--out", required=True, type=Path, help="folder for the model, train.log and checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out "
                   "(its saved config wins, except --max-minutes/--threads/--eval-questions/--checkpoint-every)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop with a checkpoint after this long (probe)")
    p.add_argument("--seed", type=int, default=0)
    for stage in ("vision", "caption", "align", "joint"):
        p.add_argument(f"--{stage}-steps", type=int, default=None, help=f"{stage} stage steps (default: config's)")
    p.add_argument("--caption-start-layers", type=int, default=None,
                   help="caption stage: train this many decoder layers first, then double them by stacking "
                        "(default 2; 0 trains every layer from the start)")
    p.add_argument("--caption-stack-at", default=None,
                   help="comma-separated caption steps after which the depth doubles (default 3000,5000,7000)")
    p.add_argument("--language-init", default=None,
                   help="LLaVA folder whose language model seeds this one, 'bundled' (the first model), "
                        "or 'none' (default)")
    p.add_argument("--caption-curriculum", default=None,
                   help="caption stage's first steps ask only some question types, e.g. "
                        "'600=position;1200=position,compare' (then every type; default "
                        "'600=position;1200=position,compare;1800=position,compare,count'); '' for none")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto: where the run trains")
    p.add_argument("--text-layers", type=int, default=None, help="decoder layers (default 16)")
    p.add_argument("--text-hidden", type=int, default=None,
                   help="decoder width (default 192; --language-init needs the same width)")
    p.add_argument("--text-intermediate", type=int, default=None, help="decoder MLP width (default 512)")
    p.add_argument("--patch-size", type=int, default=None, help="16: 64 image tokens (default); 32: 16 tokens")
    p.add_argument("--max-steps", type=int, default=None, help="cap the steps of each stage (smoke tests)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 250)")
    p.add_argument("--eval-questions", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a very small architecture (smoke tests)")
    p.set_defaults(func=_cmd_train_mosaic)

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

    from qvlm.analysis import DEPENDENCY_REPORT, dependency_diagnostics, store_dependency_report
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
