"""The app's default Start on a random model with a hub checkpoint's exact shapes: seconds, peak memory, answers/s.

Why: the bundled models are 128-768 wide; whether a visitor can quantize a real small LLaVA on a free CPU Space
(2 cores, 16 GB) is a question of time and memory at the real widths and depth. No hub is reachable here, so the
model is random, built from the public config (``tests/hub_configs.py``: for llava-interleave-qwen-0.5b,
SigLIP-so400m at 384 px, 26 layers, + Qwen2-0.5B, 24 layers, 151,936-row tied embeddings), at full depth. Random
weights give meaningless answers but the same arithmetic: every figure here is a cost, none an accuracy.

What runs is what a Start click runs: the model folder loaded by :func:`qvlm.models.load_vlm`, then
:func:`qvlm.quant.quantize` with the form's defaults (W4A4 ``qvlm``, the recommended preset, the quick run size:
16 calibration pairs, 2 VEO epochs), in a fresh process whose peak resident memory is the Start's. Then the FP model
and the quantized one answer the same easy-VQA questions, interleaved (FP, Q, FP, Q), the quantized one on whatever
kernels the measured choice picks (:func:`qvlm.quant.integer.use_integer_kernels`).

    python benchmarks/hub_shaped_start.py [--hub-id llava-hf/llava-interleave-qwen-0.5b-hf] [--questions 8] \\
        [--json benchmarks/results/hub_shaped_start.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvlm.quant.kernels import cpu_flags, cpu_model  # noqa: E402  (the flags every speed figure names)

QWEN2_VOCAB = 151_936
"""Rows of Qwen2's embedding and output tables (the public Qwen/Qwen2-0.5B config.json)."""
FULL_DEPTH = {"llava-hf/llava-interleave-qwen-0.5b-hf": {"vision_layers": 26, "text_layers": 24,
                                                         "image_size": 384, "vocab_size": QWEN2_VOCAB}}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build(hub_id: str, folder: Path) -> None:
    """Write the random full-depth model folder (in its own process, so its memory is not the Start's)."""
    from tests.families import build_hub_shaped

    build_hub_shaped(hub_id, folder, **FULL_DEPTH[hub_id])


def measure(folder: Path, questions: int) -> dict:
    """Load, Start (the form's defaults), then FP and quantized answers/s on the same questions, interleaved."""
    import torch

    from qvlm.data import get_task
    from qvlm.evaluation.accuracy import evaluate
    from qvlm.models import load_vlm
    from qvlm.quant import QuantConfig, quantize
    from qvlm.quant.integer import use_integer_kernels
    from qvlm.quant.memory import resident_bytes
    from qvlm.ui.run_size import DEFAULT_RUN_SIZE, RUN_SIZES

    size = RUN_SIZES[DEFAULT_RUN_SIZE]
    out: dict = {"threads": torch.get_num_threads(), "run_size": size.name}
    start = time.perf_counter()
    fp = load_vlm(folder)
    out["load_s"] = round(time.perf_counter() - start, 1)
    out["fp_resident_bytes"] = resident_bytes(fp.model)
    out["rss_after_load_bytes"] = peak_rss_bytes()
    cfg = QuantConfig(recipe="qvlm", w_bits=4, a_bits=4, calib_size=size.calib_size, veo_epochs=size.veo_epochs)
    stages: set[str] = set()

    def progress(stage: str, fraction: float, message: str) -> None:
        if stage not in stages:  # a long run says where it is
            print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", file=sys.stderr, flush=True)
        stages.add(stage)

    start = time.perf_counter()
    result = quantize(fp, cfg, progress=progress)
    out["start_s"] = round(time.perf_counter() - start, 1)
    out["start_peak_rss_bytes"] = peak_rss_bytes()
    out["stage_s"] = {k: round(v, 1) for k, v in result.timings.items()}
    out["quantized_resident_bytes"] = resident_bytes(result.handle.model)
    kernels = use_integer_kernels(result.handle)
    out["kernels"] = kernels.get("path")
    out["answering_resident_bytes"] = resident_bytes(result.handle.model)
    samples = get_task(fp.task).evaluation_subset(questions)
    rates: dict[str, list[float]] = {"fp": [], "quantized": []}
    for _ in range(2):
        for name, handle in (("fp", fp), ("quantized", result.handle)):
            ev = evaluate(handle.model, handle.processor, samples, batch_size=questions)
            rates[name].append(round(ev.answers_per_second, 3))
    out["answers_per_second"] = rates
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub-id", default="llava-hf/llava-interleave-qwen-0.5b-hf", choices=sorted(FULL_DEPTH))
    parser.add_argument("--questions", type=int, default=8, help="easy-VQA test questions each model answers")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build is not None:
        build(args.hub_id, args.build)
        return 0
    if args.child is not None:  # the measuring process: print one JSON line
        print("RESULT " + json.dumps(measure(args.child, args.questions), default=str))
        return 0
    with tempfile.TemporaryDirectory(prefix="hub-shaped-") as tmp:
        folder = Path(tmp) / "model"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--hub-id", args.hub_id, "--build", str(folder)], check=True, cwd=ROOT)
        built_s = time.perf_counter() - start
        done = subprocess.run([sys.executable, __file__, "--child", str(folder), "--questions", str(args.questions)],
                              check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        report = {"hub_id": args.hub_id, "shape": FULL_DEPTH[args.hub_id], "build_s": round(built_s, 1),
                  "cpu_flags": " ".join(cpu_flags()), "cpu": cpu_model(),
                  **json.loads(line[len("RESULT "):])}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
