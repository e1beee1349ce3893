"""The paper's Table 4 (latency and memory) on this machine, for the Linears of one layer.

Why only the Linears: they are what quantization changes (attention, norms and activations run the
same in every row). Two layers at the paper's widths, random weights: a LLaMA-7B decoder layer
(hidden 4096, MLP 11008: q, k, v, o, gate, up, down) and a CLIP-L vision layer (1024 / 4096: q, k, v,
out, fc1, fc2), each fed ``--tokens`` rows (a prefill of 512, a decode step of 16). Formats: FP32, bf16,
bitsandbytes NF4 (W4A16, ``bitsandbytes.nn.Linear4bit`` on the CPU, no double quantization, as
:mod:`qvlm.quant.quantizers` stores NF4) and :class:`qvlm.quant.integer.IntegerLinear` at W8A8 and W4A4
(per-channel weights, dynamic per-token activations) on every integer accumulator of
:data:`qvlm.quant.kernels.ACCUMULATORS`; an accumulator whose sums fail the exact check at that bit-width
(fbgemm and oneDNN at 8-bit activations on AVX2: saturated 16-bit pair sums) gets a row that says so. Latency:
median over ``--repeats`` runs of all the layer's Linears after ``--warmup`` runs (one run where a format is
over 10x slower than FP32); weight bytes: what each format holds for the weights (biases excluded).

    python benchmarks/table4.py [--tokens 512,16] [--repeats 20] [--threads N] [--small] [--out STEM]

The header names the CPU's instruction-set flags; results go to ``benchmarks/results/table4-<kind>``, one
table per CPU kind (``avx2``: no int8 dot-product instructions; ``vnni``: AVX512-VNNI or AVX-VNNI; ``amx``).
Run it on an otherwise idle machine; ``--small`` (widths / 8) is a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.quant.integer import IntegerLinear  # noqa: E402
from qvlm.quant.kernels import ACCUMULATORS, ISA_CAPS, accumulator_error, cpu_flags, cpu_kind, cpu_model  # noqa: E402
from qvlm.quant.packing import PackedLinear  # noqa: E402
from qvlm.quant.quantizers import encode_uniform  # noqa: E402

LAYERS = {
    "LLaMA-7B decoder layer": [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
                               ("o_proj", 4096, 4096), ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008),
                               ("down_proj", 11008, 4096)],
    "CLIP-L vision layer": [("q_proj", 1024, 1024), ("k_proj", 1024, 1024), ("v_proj", 1024, 1024),
                            ("out_proj", 1024, 1024), ("fc1", 1024, 4096), ("fc2", 4096, 1024)],
}
"""Each layer's Linears as (name, in, out)."""

FORMATS = ("FP32", "bf16", "NF4 (W4A16, bitsandbytes)",
           *(f"integer W{b}A{b} on {a}" for b in (8, 4) for a in ACCUMULATORS))


def build(fmt: str, linear: nn.Linear) -> tuple[nn.Module, torch.dtype, int]:
    """(layer, input dtype, weight bytes) of ``linear`` stored as ``fmt``."""
    w = linear.weight.detach()
    if fmt == "FP32":
        return linear, torch.float32, w.numel() * 4
    if fmt == "bf16":
        return _bf16(linear), torch.bfloat16, w.numel() * 2
    if fmt.startswith("NF4"):
        return _nf4(linear)
    bits = 8 if "W8A8" in fmt else 4
    name = fmt.rsplit(" on ", 1)[1]
    packed = PackedLinear.from_encoded(encode_uniform(w, bits), linear.bias, None, None, torch.float32)
    layer = IntegerLinear.from_packed(packed, dynamic=True, act_bits=bits, accumulator=name)
    why = ACCUMULATORS[name].unavailable() or accumulator_error(ACCUMULATORS[name], layer.codes, bits)
    if why:
        raise RuntimeError(why)
    return layer, torch.float32, layer.storage_bytes()


def _bf16(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, dtype=torch.bfloat16)
    copy.load_state_dict(linear.state_dict())
    return copy.requires_grad_(False).eval()


def _nf4(linear: nn.Linear) -> tuple[nn.Module, torch.dtype, int]:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=False, quant_type="nf4")
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to("cpu")  # quantizes the weight
    state = layer.weight.quant_state
    held = [layer.weight.data, state.absmax] + ([state.state2.absmax] if state.nested else [])
    return layer, torch.float32, sum(t.numel() * t.element_size() for t in held)


@torch.inference_mode()
def measure_layer(linears: list[tuple[str, int, int]], fmt: str, tokens: int, repeats: int, warmup: int,
                  seed: int = 0, fp32_seconds: float | None = None) -> dict:
    """Median seconds of one pass through all ``linears`` stored as ``fmt``, their weight bytes and
    the mean relative output error against FP32 (a check that the format computes the right thing)."""
    torch.manual_seed(seed)
    layers, inputs, refs, total_bytes = [], [], [], 0
    for _name, in_f, out_f in linears:
        fp = nn.Linear(in_f, out_f).requires_grad_(False).eval()
        x = torch.randn(tokens, in_f)
        layer, dtype, n_bytes = build(fmt, fp)
        refs.append(fp(x))
        layers.append(layer)
        inputs.append(x.to(dtype))
        total_bytes += n_bytes
    start = time.perf_counter()  # the checked pass is the first warm-up, and for a very slow format the measurement
    errors = [float((layer(x).float() - ref).norm() / ref.norm()) for layer, x, ref in zip(layers, inputs, refs)]
    first = time.perf_counter() - start
    if fp32_seconds and first > 10 * fp32_seconds:  # torch._int_mm on AVX2 at 7B widths: minutes say enough once
        return {"seconds": first, "weight_bytes": total_bytes, "rel_error": statistics.fmean(errors), "runs": 1}
    for _ in range(warmup):
        for layer, x in zip(layers, inputs):
            layer(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for layer, x in zip(layers, inputs):
            layer(x)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "weight_bytes": total_bytes, "rel_error": statistics.fmean(errors),
            "runs": repeats}


def machine() -> dict:
    """What the numbers depend on: CPU model, its vector / int8 / bf16 instructions, threads, ISA caps."""
    caps = {v: os.environ[v] for v in ISA_CAPS if v in os.environ}
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "isa": cpu_flags(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "caps": caps, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Table 4 on this machine: latency and weight memory of one layer's Linears",
        "",
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs; flags: {' '.join(m['isa']) or 'none read'}; torch's CPU "
        f"capability {m.get('capability', '?')}{'; caps ' + str(m['caps']) if m.get('caps') else ''}), torch "
        f"{m['torch']}, {m['threads']} threads, {m['date']}. Median of {result['repeats']} runs after "
        f"{result['warmup']} warm-up runs{', widths / 8 (smoke test)' if result['small'] else ''}. "
        "Random weights; integer rows: per-channel weights, dynamic per-token activations.",
        "",
        "| Layer | Tokens | Format | Latency (ms) | Speed-up vs FP32 | Weight MB | Memory saving vs FP32 | Rel. output error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['tokens']} | {row['format']} | not run: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['layer']} | {row['tokens']} | {row['format']} | {row['seconds'] * 1e3:.2f}"
                     f"{' (1 run)' if row.get('runs') == 1 else ''} | "
                     f"{row['speedup_vs_fp32']:.2f}x | {row['weight_bytes'] / 2**20:.2f} | "
                     f"{row['memory_saving_vs_fp32']:.2f}x | {row['rel_error']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,16", help="rows fed to each Linear, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--small", action="store_true", help="widths / 8: a smoke test, not a measurement")
    parser.add_argument("--out", default=None,
                        help="path stem of the .md and .json written (default benchmarks/results/table4-<CPU kind>)")
    args = parser.parse_args(argv)
    try:
        token_counts = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        parser.error("--tokens takes whole numbers, comma-separated")
    if not token_counts or min(token_counts) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--tokens and --repeats must be at least 1, --warmup at least 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = 8 if args.small else 1
    rows = []
    for (layer_name, linears), tokens in itertools.product(LAYERS.items(), token_counts):
        shapes = [(n, i // scale, o // scale) for n, i, o in linears]
        fp32 = None
        for fmt in FORMATS:
            row = {"layer": layer_name, "tokens": tokens, "format": fmt, "linears": shapes}
            try:
                row |= measure_layer(shapes, fmt, tokens, args.repeats, args.warmup,
                                     fp32_seconds=fp32["seconds"] if fp32 else None)
            except (ImportError, RuntimeError) as exc:  # bitsandbytes missing or without a CPU backend
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                rows.append(row)
                continue
            fp32 = fp32 or row
            row["speedup_vs_fp32"] = fp32["seconds"] / row["seconds"]
            row["memory_saving_vs_fp32"] = fp32["weight_bytes"] / row["weight_bytes"]
            rows.append(row)
            print(f"{layer_name:24s} {tokens:4d} {fmt:32s} {row['seconds'] * 1e3:9.2f} ms  "
                  f"{row['weight_bytes'] / 2**20:8.2f} MB", flush=True)
    result = {"machine": machine(), "tokens": token_counts, "repeats": args.repeats, "warmup": args.warmup,
              "small": args.small, "rows": rows}
    kind = cpu_kind(result["machine"]["isa"])
    out = Path(args.out or Path(__file__).parent / "results" / f"table4-{kind}{'-small' if args.small else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
