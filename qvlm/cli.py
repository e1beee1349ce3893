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

    cfg = TrainConfig(
        seed=args.seed,
        vision_epochs=args.vision_epochs,
        joint_epochs=args.joint_epochs,
        max_steps=args.max_steps,
        train_images=args.train_images,
        eval_questions=args.eval_questions,
        threads=args.threads,
    )
    if args.tiny:
        from qvlm.training.tiny_llava import TinyLlavaSpec

        cfg.spec = TinyLlavaSpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
                                 text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    report = train_tiny_llava(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "train_config"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from qvlm.data import evaluation_subset
    from qvlm.eval import evaluate
    from qvlm.models import load_vlm

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of questions")
    handle = load_vlm(args.model)
    samples = evaluation_subset(args.limit)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tiny", help="train the bundled tiny LLaVA on easy-VQA (CPU, ~35 min on 2 cores)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the model and processor to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision-epochs", type=int, default=30)
    p.add_argument("--joint-epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None, help="cap the steps of each stage (smoke tests)")
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--eval-questions", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a very small architecture (smoke tests)")
    p.set_defaults(func=_cmd_train_tiny)

    p = sub.add_parser("eval", help="easy-VQA test accuracy of a model (overall and per question type)")
    p.add_argument("--model", default="bundled", help="model folder, hub id, or 'bundled' (default)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    p.set_defaults(func=_cmd_eval)
    return parser


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
