"""Command line: ``python -m qvlm eval | quantize | diagnose | bench``.

Re-training the bundled models is a separate tool: ``python -m training tiny | mosaic`` (``training/``).

Every command reports bad input as one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class RenamedOption(argparse.Action):
    """An old spelling of an option: still works, and says its new name in one line on stderr."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is now {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_recipe_option(parser: argparse.ArgumentParser, default: str | None, help: str,
                      old: tuple[str, ...] = ("--method", "--methods", "--recipes")) -> None:
    """``--recipe``, the one spelling of the recipe in every command and script; ``old`` spellings still work.

    Where several recipes make sense (bench, the benchmark scripts) the value is a comma list.
    """
    parser.add_argument("--recipe", default=default, help=help)
    for flag in old:
        parser.add_argument(flag, dest="recipe", action=RenamedOption, new_name="--recipe")


def recipe_list(text: str | None) -> list[str]:
    """``"rtn, qvlm"`` -> ``["rtn", "qvlm"]``, with each name checked against :data:`qvlm.quant.RECIPES`."""
    from qvlm.quant import RECIPES

    names = [r.strip() for r in (text or "").split(",") if r.strip()]
    for r in names:
        if r not in RECIPES:
            raise ValueError(f"unknown recipe {r!r} for --recipe; choose from {', '.join(RECIPES)}")
    return names


def _cmd_eval(args: argparse.Namespace) -> int:
    from qvlm.data import get_task
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.export import load_model
    from qvlm.models import task_note
    from qvlm.quant.memory import fp_model_bytes, resident_bytes

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    handle = load_model(args.model)
    note = task_note(handle)
    if note:
        print(note)
    samples = get_task(handle.task).evaluation_subset(args.limit)
    with StageBars() as progress:
        result = evaluate(handle.model, handle.processor, samples, batch_size=args.batch_size, progress=progress)
    print(format_eval(handle.name, result, handle.simulated_layers))
    memory = {"resident_bytes": resident_bytes(handle.model), "fp_model_bytes": fp_model_bytes(handle.model)}
    print(memory_line(**memory))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": handle.name, "task": handle.task, **result.to_dict(), **memory},
                                        indent=2))
    return 0


def format_eval(name: str, result, simulated: dict[str, str] | None = None) -> str:
    """The eval lines: accuracy, per question type, answers/s and the path that answered (``result.kernels``).

    ``simulated``: quantized Linears off integer kernels (on the float or the simulated path) -> why; a run with
    any says how many, and the first reason.
    """
    lines = [f"model: {name}", f"accuracy: {result.accuracy:.4f} on {result.n} test questions"]
    for qtype, acc in result.per_type.items():
        lines.append(f"  {qtype:7s} {acc:.4f} ({result.counts[qtype]} questions)")
    lines.append(f"answers/second: {result.answers_per_second:.1f} ({result.seconds:.1f} s) on {result.kernels}")
    if simulated:
        first, reason = next(iter(simulated.items()))
        lines.append(f"  {len(simulated)} quantized Linear(s) off integer kernels, e.g. {first}: {reason}")
    return "\n".join(lines)


def memory_line(resident_bytes: int, fp_model_bytes: int) -> str:
    """What the model held while it answered (its parameters and buffers, measured), next to its FP model's."""
    if resident_bytes == fp_model_bytes:
        return f"memory: {resident_bytes:,} bytes of parameters and buffers while answering"
    return (f"memory: {resident_bytes:,} bytes of parameters and buffers while answering, "
            f"{100 * resident_bytes / fp_model_bytes:.0f}% of the {fp_model_bytes:,} its FP model holds here "
            "(QVLM_MEMORY caps what kernels may hold: fp, packed, unlimited)")


class StageBars:
    """The core's ``(stage, fraction, message)`` callback as tqdm bars: one line per stage, labelled with it.

    A stage's bar is closed at 100% when the next stage starts or the run ends; a run stopped by a
    cancel or Ctrl-C leaves its last bar saying "cancelled" (any other error: "failed") instead.
    ``prefix`` goes before every label (``diagnose`` names the bit setting).
    """

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| "

    def __init__(self, prefix: str = "", file=None) -> None:
        self.prefix = prefix
        self.file = file
        self.bar = None
        self.stage: str | None = None

    def __enter__(self):
        return self.update

    def update(self, stage: str, fraction: float, message: str) -> None:
        from tqdm.auto import tqdm

        if stage != self.stage:
            self._close(self.FORMAT)
            self.stage = stage
            label = f"{self.prefix} {stage}" if self.prefix else stage
            self.bar = tqdm(total=1000, desc=label, unit="‰", file=self.file, bar_format=self.FORMAT)
        self.bar.bar_format = self.FORMAT + _literal(message)
        self.bar.n = int(fraction * 1000)
        self.bar.refresh()

    def _close(self, bar_format: str) -> None:
        if self.bar is None:
            return
        if bar_format == self.FORMAT:
            self.bar.n = self.bar.total
        self.bar.bar_format = bar_format + self.bar.bar_format[len(self.FORMAT):]
        self.bar.close()
        self.bar = None

    def __exit__(self, exc_type, exc, tb) -> None:
        from qvlm.utils.progress import Cancelled

        if exc_type is None:
            self._close(self.FORMAT)
        else:
            word = "cancelled" if issubclass(exc_type, (Cancelled, KeyboardInterrupt)) else "failed"
            self._close("{desc}: " + word + "|{bar}| ")


def _literal(text: str) -> str:
    """``text`` inside a tqdm bar format, where braces are fields."""
    return text.replace("{", "{{").replace("}", "}}")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qvlm.data import get_task
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.export import load_model
    from qvlm.quant import QuantConfig, quantize
    from qvlm.quant.acceptance import acceptance_sentence
    from qvlm.quant.presets import DEFAULT_PRESET

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    overrides = {}
    if args.config is not None:  # the fields the file sets win over the preset; --recipe and --bits over the file
        text = args.config.read_text()
        loaded = QuantConfig.from_json(text)
        overrides = {k: getattr(loaded, k) for k in json.loads(text) if k not in ("recipe", "w_bits", "a_bits")}
    file_preset = overrides.pop("preset", DEFAULT_PRESET)
    preset = args.preset or file_preset
    if args.calib_size is not None:
        overrides["calib_size"] = args.calib_size
    overrides.update(vision_bits(args.vision_bits))
    cfg = QuantConfig.from_bits(args.bits, recipe=args.recipe, preset=preset, **overrides)
    if args.save is not None:
        from qvlm.export import export_refusal

        refusal = export_refusal(cfg, args.format)
        if refusal:
            raise ValueError(refusal)
    handle = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.to_json())
    with StageBars() as progress:
        result = quantize(handle, cfg, progress=progress)
    (args.out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    if args.save is not None:
        from qvlm.export import save_quantized
        from qvlm.export.sizes import measure_export, model_folder

        save_quantized(result.handle, args.save, cfg.to_dict(), result.to_dict(), format=args.format)
        plain = args.format != "qvlm-packed"
        reload = (f"LlavaForConditionalGeneration.from_pretrained (transformers + {args.format})"
                  if plain else "qvlm.load_quantized")
        print(f"saved the model ({args.format}) to {args.save}; reload with {reload}")
        sizes = measure_export(args.save, plain, fp_model=handle.model, fp_folder=model_folder(args.model))
        print(f"measured: {sizes.sentence()}")
    t = result.timings
    print(f"{handle.name}: {cfg.recipe} {cfg.bits_label} in {t.get('total', 0.0):.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in t.items() if k != 'total')})")
    if result.blocks and result.entropies:
        print(f"blocks: {result.blocks}  h0 = {result.h0:.4f}")
        print(acceptance_sentence(result.search))
    if args.eval:
        from qvlm.quant.integer import use_integer_kernels

        use_integer_kernels(result.handle)  # after saving: the exporters read the packed layers
        samples = get_task(handle.task).evaluation_subset(args.limit)
        with StageBars() as progress:
            ev = evaluate(result.handle.model, result.handle.processor, samples, batch_size=args.batch_size,
                          progress=progress)
        print(format_eval(result.handle.name, ev, result.handle.simulated_layers))
        (args.out / "eval.json").write_text(json.dumps({"model": result.handle.name, "config": cfg.to_dict(),
                                                        "limit": args.limit, **ev.to_dict()}, indent=2))
    print(f"wrote {args.out}")
    return 0


def vision_bits(text: str | None) -> dict[str, int]:
    """``--vision-bits w4a8`` -> ``{"vision_w_bits": 4, "vision_a_bits": 8}``; {} when not given."""
    from qvlm.quant.config import parse_bits

    if text is None:
        return {}
    w_bits, a_bits = parse_bits(text)
    return {"vision_w_bits": w_bits, "vision_a_bits": a_bits}


def add_preset_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--preset`` and ``--vision-bits``: the starting values of a run, and the vision tower's own bits."""
    parser.add_argument("--preset", default=default,
                        help="starting values: recommended (default; the measured best), paper (the paper's "
                             "text), authors-code (the authors' released code), deployable (the formats the "
                             "integer kernels run) or integer (deployable with the vision inputs rotated)")
    parser.add_argument("--vision-bits", default=None,
                        help="bits of the vision-tower Linears, e.g. w4a8 (default: those of --bits)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from qvlm.evaluation.bench import BenchOptions, run_bench
    from qvlm.quant import RECIPES, QuantConfig

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    bits = tuple(b.strip().upper() for b in args.bits.split(",") if b.strip())
    for b in bits:
        QuantConfig.from_bits(b)  # validates the spelling
    recipes = tuple(recipe_list(args.recipe)) or tuple(r for r in RECIPES if r != "fp")
    if "fp" in recipes:
        raise ValueError("the bench measures FP on its own: leave fp out of --recipe")
    opts = BenchOptions(model=args.model, bits=bits, recipes=recipes, limit=args.limit, calib_size=args.calib_size,
                        batch_size=args.batch_size, w3a3=args.w3a3, ded=not args.no_ded,
                        ded_samples=args.ded_samples, timing_baseline=not args.no_timing, out_dir=args.out,
                        timing_repeats=args.timing_repeats,
                        calib_sweep=tuple(int(x) for x in args.calib_sweep.split(",") if x.strip()))
    run_bench(opts)
    print(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


def _add_quant_commands(sub) -> None:
    """The ``quantize``, ``diagnose`` and ``bench`` subcommands (they run the quantization core)."""
    p = sub.add_parser("quantize", help="quantize a model with one recipe; save config, statistics (and accuracy)")
    p.add_argument("--model", default="bundled", help="model folder, hub id, 'bundled' (default: the easy-VQA model) or 'mosaic' (the mosaic model)")
    p.add_argument("--bits", default="w4a4", help="weight/activation bits, e.g. w4a4, W6A6, w8a8")
    add_recipe_option(p, "qvlm", "recipe: fp, rtn, qlora, awq, qvlm-cdm, qvlm-veo, qvlm")
    p.add_argument("--config", type=Path, default=None, help="a QuantConfig JSON file for the other parameters")
    add_preset_options(p, None)  # None: the --config file's preset, else recommended
    p.add_argument("--calib-size", type=int, default=None, help="calibration pairs (default 64)")
    p.add_argument("--eval", action="store_true", help="also measure easy-VQA test accuracy")
    p.add_argument("--limit", type=int, default=None, help="with --eval: a fixed random subset of N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, type=Path, help="folder for config.json, result.json, eval.json")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the packed quantized model (safetensors + JSON) to this folder")
    p.add_argument("--format", choices=("qvlm-packed", "compressed-tensors", "bitsandbytes"), default="qvlm-packed",
                   help="format of --save: the project's packed layout, or compressed-tensors (uniform weights; "
                        "loads in plain transformers)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("diagnose", help="do the decoder layers interact? dependency diagnostics -> the model "
                                         "folder's dependency_report.json (shown in the Analysis tab)")
    p.add_argument("--model", default="bundled", help="'bundled', 'mosaic', a model folder or a hub id")
    p.add_argument("--bits", default="W4A3", help="comma-separated bit settings (default W4A3)")
    add_recipe_option(p, "qvlm-cdm", "the recipe whose ranges and search are diagnosed")
    add_preset_options(p, "recommended")
    p.add_argument("--samples", type=int, default=16, help="calibration samples per pair (default 16)")
    p.add_argument("--out", type=Path, default=None, help="report file (default: MODEL/dependency_report.json)")
    p.add_argument("--fp-vision", action="store_true", help="keep the vision tower in full precision: the "
                   "language model's layers alone (stored as e.g. 'W4A3 vision FP')")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("bench", help="FP and every recipe at W8A8/W6A6/W4A4 -> benchmarks/results/bench.{md,json}")
    p.add_argument("--model", default="bundled")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N test questions")
    p.add_argument("--bits", default="W8A8,W6A6,W4A4", help="comma-separated bit settings")
    add_recipe_option(p, None, "comma-separated recipes (default: all but fp)")
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
    overrides = vision_bits(args.vision_bits) | ({"quantize_vision": False} if args.fp_vision else {})
    # validates before loading; an unquantized vision tower (--fp-vision, or the preset's): the language
    # model's own interaction, stored apart
    configs = {}
    for b in bits:
        cfg = QuantConfig.from_bits(b, recipe=args.recipe, preset=args.preset, **overrides)
        configs[cfg.bits_label if cfg.quantize_vision else f"{cfg.bits_label} vision FP"] = cfg
    handle = load_vlm(args.model)
    out = args.out
    if out is None:
        if handle.source == "hub":
            raise ValueError("a hub model has no folder to store the report in: pass --out FILE")
        out = Path(args.model if handle.source == "local" else _bundled_folder(handle.name)) / DEPENDENCY_REPORT
    for b, cfg in configs.items():
        start = time.perf_counter()
        with StageBars(b) as progress:
            report = dependency_diagnostics(handle, cfg, n_samples=args.samples, progress=progress)
        store_dependency_report(out, b, report, model=handle.name, task=handle.task, recipe=args.recipe,
                                preset=cfg.preset, samples=args.samples, seconds=round(time.perf_counter() - start, 1))
        shares = [p.interaction_share for p in report.pairs]
        print(f"{b}: interaction share per pair {', '.join(f'{100 * s:.1f}%' for s in shares if s is not None)}")
        print(f"{b}: {report.verdict}")
    print(f"wrote {out}")
    return 0


def _bundled_folder(name: str) -> Path:
    from qvlm.models import BUNDLED_MODELS

    return BUNDLED_MODELS[name]


BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"


def _drop_bnb_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    """False for bitsandbytes' import-time notice that its optional CPU kernel is not trusted.

    bitsandbytes (``backends/cpu/ops.py``) tries to fetch a CPU ``gemm_4bit_forward`` kernel from the
    hub through ``kernels`` and logs a warning when that is refused; it then uses its own code, so
    the notice tells a CLI user nothing. Only that message is dropped; loading remote code stays off.
    """
    return not str(record.msg).startswith(BNB_CPU_KERNEL_NOTICE)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command: bad input is one line on stderr and exit status 2.

    Shared with ``python -m training`` so both tools answer a user the same way.
    """
    bnb_logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    if _drop_bnb_cpu_kernel_notice not in bnb_logger.filters:
        bnb_logger.addFilter(_drop_bnb_cpu_kernel_notice)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
