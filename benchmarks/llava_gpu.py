"""Reproduce the paper's LLaVA-1.5 rows (Table 3) on a GPU with hub access. Not used by tests.

    pip install datasets accelerate
    python benchmarks/llava_gpu.py --model llava-hf/llava-1.5-7b-hf --dataset scienceqa-img \
        --limit 500 --bits W6A6,W4A4 --recipe fp,qlora,awq,qvlm --out benchmarks/results/llava15_7b.json

For every (recipe, bits) it reports accuracy on a fixed subset, the quantization time, the peak
GPU memory and the generation speed (answers per second). Calibration uses the dataset's
*train* split (64 pairs by default, as the paper), never the evaluated split.

The datasets are the hub tasks of :mod:`qvlm.data.hub` (``scienceqa-img``, ``vqav2``: prompts
and scoring are described there), and every row is one
:func:`qvlm.evaluation.bench.quantize_and_evaluate`, the loop of ``python -m qvlm bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.cli import add_recipe_option, recipe_list  # noqa: E402
from qvlm.data import HUB_TASKS, get_task  # noqa: E402
from qvlm.evaluation.bench import quantize_and_evaluate  # noqa: E402
from qvlm.models import default_dtype, load_vlm, resolve_device  # noqa: E402
from qvlm.quant import QuantConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    p.add_argument("--dataset", choices=sorted(HUB_TASKS), default="scienceqa-img")
    p.add_argument("--limit", type=int, default=500, help="evaluated questions (fixed seeded subset)")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--bits", default="W6A6,W4A4")
    add_recipe_option(p, "fp,qlora,awq,qvlm", "comma-separated recipes (fp: the model as loaded)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--veo-micro-batch", type=int, default=1,
                   help="pairs per VEO backward (1 keeps 7B's VEO within a 24 GB GPU; see benchmarks/README.md)")
    p.add_argument("--no-veo-checkpoint", action="store_true", help="keep all LLM activations in VEO's backward")
    p.add_argument("--device", default=None, help="cuda, cuda:N (default: QVLM_DEVICE, else the first GPU)")
    p.add_argument("--dtype", choices=("float16", "auto"), default="float16",
                   help="float16 as the paper's runs; auto: bfloat16 where the GPU supports it")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/llava_gpu.json"))
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)  # the app's device path: --device, else QVLM_DEVICE, else CUDA if any
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("error: this benchmark needs a CUDA GPU (QVLM_DEVICE / --device chose the CPU)", file=sys.stderr)
        return 2
    try:
        recipes = recipe_list(args.recipe)
        task = get_task(args.dataset)
        eval_samples = task.evaluation_subset(args.limit)
        calib_samples = task.calibration_split(args.calib_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = torch.float16 if args.dtype == "float16" else default_dtype(device)
    fp = load_vlm(args.model, dtype=dtype, device=device)
    rows = []
    for recipe in recipes:
        for bits in (["FP"] if recipe == "fp" else args.bits.split(",")):
            common = {"recipe": recipe, "calib_size": args.calib_size, "veo_micro_batch": args.veo_micro_batch,
                      "veo_checkpoint": not args.no_veo_checkpoint}
            cfg = QuantConfig(**common) if recipe == "fp" else QuantConfig.from_bits(bits, **common)
            torch.cuda.reset_peak_memory_stats(device)
            row = quantize_and_evaluate(fp, cfg, eval_samples, batch_size=args.batch_size, calibration=calib_samples,
                                        score=task.score, describe=lambda result: {"timings": result.timings})
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            row["accuracy"] *= 100.0  # percent, as the paper's Table 3
            print(json.dumps({k: v for k, v in row.items() if k != "correct"}))
            rows.append(row)
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "limit": args.limit,
                                    "device": torch.cuda.get_device_name(device), "dtype": str(dtype), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
