"""Reproduce the paper's LLaVA-1.5 rows (Table 3) on a GPU with hub access. Not used by tests.

    pip install datasets accelerate
    python benchmarks/llava_gpu.py --model llava-hf/llava-1.5-7b-hf --dataset scienceqa-img \
        --limit 500 --bits W6A6,W4A4 --methods fp,qlora,awq,qvlm --out benchmarks/results/llava15_7b.json

For every (method, bits) it reports accuracy on a fixed subset, the quantization time, the peak
GPU memory and the generation speed (new tokens per second). Calibration uses the dataset's
*train* split (64 pairs by default, as the paper), never the evaluated split.

Datasets (hub ids, loaded with ``datasets``):
* ``scienceqa-img``: ``derek-thomas/ScienceQA``, questions with an image; prompt as LLaVA-1.5's
  SQA-IMG evaluation ("Answer with the option's letter from the given choices directly."),
  scored by the first option letter of the answer.
* ``vqav2``: ``lmms-lab/VQAv2`` validation ("Answer the question using a single word or phrase."),
  scored with the VQA accuracy min(#humans that gave the answer / 3, 1) on normalised strings.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.models.inference import generate_answers  # noqa: E402
from qvlm.models import default_dtype, load_vlm, resolve_device  # noqa: E402
from qvlm.quant import QuantConfig, quantize  # noqa: E402

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class HubSample:
    """Duck-types :class:`qvlm.data.VQASample` (image, question, answer) for calibration and eval."""

    image: Any
    question: str
    answer: str
    references: tuple[str, ...] = ()
    question_type: str = "all"

    def load_image(self):
        return self.image.convert("RGB")


def _scienceqa(split: str, limit: int, seed: int) -> list[HubSample]:
    from datasets import load_dataset

    ds = load_dataset("derek-thomas/ScienceQA", split=split).filter(lambda r: r["image"] is not None)
    ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    out = []
    for r in ds:
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
        hint = f"Context: {r['hint']}\n" if r.get("hint") else ""
        q = f"{hint}{r['question']}\n{options}\nAnswer with the option's letter from the given choices directly."
        out.append(HubSample(r["image"], q, LETTERS[r["answer"]], question_type=r.get("subject", "all")))
    return out


def _vqav2(split: str, limit: int, seed: int) -> list[HubSample]:
    from datasets import load_dataset

    ds = load_dataset("lmms-lab/VQAv2", split="validation" if split != "train" else "train", streaming=False)
    ds = ds.shuffle(seed=seed).select(range(min(limit, len(ds))))
    out = []
    for r in ds:
        refs = tuple(a["answer"] for a in r["answers"])
        q = f"{r['question']}\nAnswer the question using a single word or phrase."
        out.append(HubSample(r["image"], q, r["multiple_choice_answer"], refs, r.get("answer_type", "all")))
    return out


DATASETS: dict[str, Callable[[str, int, int], list[HubSample]]] = {"scienceqa-img": _scienceqa, "vqav2": _vqav2}


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def score(sample: HubSample, prediction: str, dataset: str) -> float:
    if dataset == "scienceqa-img":
        m = re.search(r"\b([A-J])\b", prediction.strip())
        return float(bool(m) and m.group(1) == sample.answer)
    pred = _normalise(prediction)
    return min(1.0, sum(_normalise(r) == pred for r in sample.references) / 3.0)


def evaluate(handle, samples: list[HubSample], dataset: str, batch_size: int) -> dict[str, float]:
    model, processor = handle.model, handle.processor
    total, new_tokens = 0.0, 0
    start = time.perf_counter()
    for at in range(0, len(samples), batch_size):
        chunk = samples[at : at + batch_size]
        answers = generate_answers(model, processor, [s.load_image() for s in chunk], [s.question for s in chunk],
                                   max_new_tokens=10)
        total += sum(score(s, a, dataset) for s, a in zip(chunk, answers))
        new_tokens += sum(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    seconds = time.perf_counter() - start
    return {"accuracy": 100.0 * total / len(samples), "eval_seconds": seconds, "tokens_per_second": new_tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="scienceqa-img")
    p.add_argument("--limit", type=int, default=500, help="evaluated questions (fixed seeded subset)")
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--bits", default="W6A6,W4A4")
    p.add_argument("--methods", default="fp,qlora,awq,qvlm")
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
    dtype = torch.float16 if args.dtype == "float16" else default_dtype(device)
    fp = load_vlm(args.model, dtype=dtype, device=device)
    load = DATASETS[args.dataset]
    eval_samples = load("test" if args.dataset == "scienceqa-img" else "validation", args.limit, 0)
    calib_samples = load("train", args.calib_size, 1)
    rows = []
    for method in args.methods.split(","):
        for bits in (["FP"] if method == "fp" else args.bits.split(",")):
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            if method == "fp":
                handle, stats = fp, {}
            else:
                cfg = QuantConfig.from_bits(bits, recipe=method, calib_size=args.calib_size,
                                            veo_micro_batch=args.veo_micro_batch,
                                            veo_checkpoint=not args.no_veo_checkpoint)
                result = quantize(fp, cfg, calibration=calib_samples)
                handle, stats = result.handle, {"timings": result.timings}
            quant_seconds = time.perf_counter() - start
            row = {"method": method, "bits": bits, "quant_seconds": quant_seconds, **stats,
                   **evaluate(handle, eval_samples, args.dataset, args.batch_size),
                   "peak_gpu_bytes": torch.cuda.max_memory_allocated(device)}
            print(json.dumps(row))
            rows.append(row)
            if handle is not fp:
                del handle, result
                torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "limit": args.limit,
                                    "device": torch.cuda.get_device_name(device), "dtype": str(dtype), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
