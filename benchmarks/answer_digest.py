"""Digests of what every recipe answers and records, to show a refactor changed neither.

    QVLM_KERNELS=simulated python benchmarks/answer_digest.py --out /tmp/digest.json [--limit N]

For each recipe (``qvlm.quant.RECIPES``) at ``--bits`` (default W4A4) on ``--model`` (default the bundled easy-VQA
model): quantize with the default config, answer the test split (or ``--limit`` questions of it) and write the
accuracy, a SHA-256 of the answers (image id, question, prediction, in order) and a SHA-256 of the run's saved record
(:meth:`QuantResult.to_dict` without its timings, which differ run to run). Two checkouts agree when every digest does.
Pin the thread count (``--threads``, default 2) and the kernel path (``QVLM_KERNELS=simulated``): both move floats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qvlm.data import get_task
from qvlm.evaluation.accuracy import evaluate
from qvlm.models import load_vlm
from qvlm.quant import RECIPES, QuantConfig, quantize

UNTIMED = ("timings", "timing_details")


def sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp = load_vlm(args.model)
    task = get_task(fp.task)
    samples = task.evaluation_subset(args.limit)
    rows = {}
    for recipe in args.recipes.split(","):
        start = time.perf_counter()
        result = quantize(fp, QuantConfig.from_bits(args.bits, recipe=recipe))
        record = {k: v for k, v in result.to_dict().items() if k not in UNTIMED}
        answers = evaluate(result.handle.model, fp.processor, samples, score=task.score)
        rows[recipe] = {"accuracy": answers.accuracy, "n": answers.n,
                        "answers_sha256": sha256([(p["image_id"], p["question"], p["prediction"])
                                                  for p in answers.predictions]),
                        "record_sha256": sha256(record), "seconds": round(time.perf_counter() - start, 1)}
        print(recipe, rows[recipe], flush=True)
        del result
        Path(args.out).write_text(json.dumps({"model": args.model, "bits": args.bits, "threads": args.threads,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
