"""Re-train the bundled models: ``python -m training tiny --out DIR`` / ``python -m training mosaic --out DIR``.

These tools build ``assets/tiny-llava-easyvqa`` and ``assets/tiny-llava-mosaic``; they sit outside the ``qvlm``
package because nothing a user runs (the app, ``python -m qvlm``) needs them. Bad input: one line on stderr,
exit status 2, as in ``python -m qvlm``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qvlm.cli import run_command


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train_tiny_llava

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
        from training.tiny_llava import TinyLlavaSpec

        cfg.spec = TinyLlavaSpec(vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
                                 text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64)
    report = train_tiny_llava(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "train_config"}, indent=2))
    return 0


def _cmd_train_mosaic(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from training.train_mosaic import MOSAIC_SPEC, SMOKE_SPEC, MosaicTrainConfig, parse_curriculum, \
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="train the bundled tiny LLaVA on easy-VQA (CPU, ~35 min on 2 cores)")
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

    p = sub.add_parser("mosaic", help="train the mosaic LLaVA in the background: resumable, logs "
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

    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
