"""How each stage of a W4A4 ``qvlm`` run grows with model width and depth: fitted exponents, and what they say for
LLaVA-1.5-7B.

Why: no GPU has been lent, and a full-depth LLaVA-1.5-7B does not fit this machine in float32 (28 GB of weights on a
24 GiB host), so the 7B cost is read off random-weight LLaVA models of the same *shape family*, measured at several
widths and depths:

* width ``h``: decoder hidden ``h``, MLP ``2.6875 h`` (4096 -> 11008), ``h / 128`` heads; vision hidden ``h / 4``, MLP
  ``h``, ``h / 64`` heads (CLIP-L: 1024 / 4096 / 16 at h = 4096); 336 px images in 14 px patches (576 image tokens);
* depth ``d``: ``d`` decoder layers and ``d + 1`` vision layers, of which ``d`` are used (the features are
  read at the second-to-last layer, as LLaVA does; 7B: 32 decoder layers, 23 used of CLIP-L's 24);
* the run: ``qvlm`` W4A4 at the recommended preset, 4 calibration pairs in one batch, 1 VEO epoch in micro-batches of 1
  with activation checkpointing, 4 held-out pairs, weights packed as layers finish (the large-model settings).

Each point runs in its own process (peak resident memory does not leak between points). Per stage, the exponent
``b`` of ``seconds ~ width^b`` (at depth 2, least squares in log-log space) and of ``seconds ~ depth^b`` (at width
1024, between the two deepest points: see :func:`fit`); the 7B projection multiplies the deepest (1024, d) point by
``(4096/1024)^b_width * (32/d)^b_depth``. The search stage is also split into its joint search and CDM's acceptance
check (``QuantResult.timing_details["search_acceptance"]``), which grow differently with depth. Time grows with the
calibration pairs too (linearly: every pass is over them), which is how the projection is scaled from 4 to 64 pairs.

    python benchmarks/scaling.py [--widths 512 1024 2048] [--depths 1 2 4 8] [--json benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_scaled import _build, _rss  # noqa: E402  (the same random LLaVA builder and RSS reader)

CALIB_PAIRS = 4
SEARCH_JOINT, SEARCH_CHECK = "search: joint (Eq. 3)", "search: acceptance check"
"""The search stage split in two: the joint search grows with the blocks' size (capped by max_block_depth), the
acceptance check with the layers after each decided block (quadratic in depth in the worst case)."""
LLAVA_7B = {"width": 4096, "depth": 32, "calib_pairs": 64}


def measure(width: int, depth: int) -> dict:
    """One ``qvlm`` W4A4 run on a random LLaVA of this width and depth: seconds per stage and peak extra memory."""
    import torch

    from qvlm.quant import QuantConfig, quantize

    torch.manual_seed(0)
    handle = _build(depth, depth + 1, hidden=width, intermediate=round(2.6875 * width), heads=max(width // 128, 1),
                    vision_hidden=width // 4, vision_intermediate=width, vision_heads=max(width // 256, 1))
    cfg = QuantConfig(recipe="qvlm", w_bits=4, a_bits=4, calib_size=CALIB_PAIRS, calib_batch=CALIB_PAIRS,
                      veo_epochs=1, veo_micro_batch=1, veo_checkpoint=True, veo_holdout_images=4, pack_weights=True)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    result = quantize(handle, cfg)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    weights = sum(p.numel() * p.element_size() for p in handle.model.parameters())
    check = result.seconds("search_acceptance")
    return {"width": width, "depth": depth, "calib_pairs": CALIB_PAIRS, "threads": torch.get_num_threads(),
            "fp_weight_bytes": weights, "peak_extra_bytes": peak[0] - base, "seconds": round(seconds, 2),
            "stages": {k: v for k, v in result.timings.items() if k != "total"},
            "search_parts": {SEARCH_JOINT: round(result.seconds("search") - check, 4), SEARCH_CHECK: check},
            "blocks": [list(b) for b in result.blocks],
            "decisions": sum(s.checked for s in result.search)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def fit(rows: list[dict], ref_width: int = 1024, width_depth: int = 2) -> dict:
    """Per stage, the search's two parts, "total" and "peak_extra_bytes": exponents in width and depth, 7B projection.

    The width exponent is fitted at depth ``width_depth``. The depth exponent used is the slope between the two
    deepest points: at shallow depth the partition's blocks are still growing toward ``max_block_depth`` (3), so the
    joint search's cost per layer rises with depth there and not beyond, and a fit through depth 1 overstates the
    growth (the slope over every depth is kept beside it). The projection starts from the deepest point.
    """
    by_width = sorted((r for r in rows if r["depth"] == width_depth), key=lambda r: r["width"])
    by_depth = sorted((r for r in rows if r["width"] == ref_width), key=lambda r: r["depth"])
    ref = by_depth[-1] if by_depth else None
    stages = sorted({k for r in rows for k in r["stages"]})
    parts = sorted({k for r in rows for k in r.get("search_parts", {})})
    quantities = stages + parts + ["total", "peak_extra_bytes"]

    def value(r: dict, q: str) -> float:
        if q == "total":
            return r["seconds"]
        if q == "peak_extra_bytes":
            return r[q]
        return r["stages"].get(q, r.get("search_parts", {}).get(q, 0.0))

    out = {}
    for q in quantities:
        bw = slope([r["width"] for r in by_width], [value(r, q) for r in by_width])
        bd = slope([r["depth"] for r in by_depth[-2:]], [value(r, q) for r in by_depth[-2:]])
        bd_all = slope([r["depth"] for r in by_depth], [value(r, q) for r in by_depth])
        projected = None
        if ref is not None and bw is not None and bd is not None:
            pairs = 1.0 if q == "peak_extra_bytes" else LLAVA_7B["calib_pairs"] / CALIB_PAIRS
            projected = (value(ref, q) * (LLAVA_7B["width"] / ref_width) ** bw
                         * (LLAVA_7B["depth"] / ref["depth"]) ** bd * pairs)
        out[q] = {"width_exponent": bw, "depth_exponent": bd, "depth_exponent_all": bd_all,
                  "llava_7b_projection": projected}
    return out


def table(fitted: dict) -> str:
    lines = ["| stage | exponent in width | exponent in depth (two deepest) | (all depths) "
             "| LLaVA-1.5-7B shape, 64 pairs (projected) |", "|---|---|---|---|---|"]
    for q, f in fitted.items():
        def num(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f}"

        proj = f["llava_7b_projection"]
        if proj is None:
            shown = "–"
        elif q == "peak_extra_bytes":
            shown = f"{proj / 2**30:.1f} GiB (4 pairs)"
        else:
            shown = f"{proj / 3600:.1f} h" if proj > 3600 else f"{proj / 60:.1f} min"
        lines.append(f"| {q} | {num(f['width_exponent'])} | {num(f['depth_exponent'])} | "
                     f"{num(f.get('depth_exponent_all'))} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: one (width, depth) point
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    points = [(w, 2) for w in args.widths] + [(1024, d) for d in args.depths if d != 2]
    rows = []
    for width, depth in points:
        out = subprocess.run([sys.executable, __file__, "--one", str(width), str(depth)], check=True,
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"width {width} depth {depth}: {r['seconds']} s, peak extra {r['peak_extra_bytes'] / 2**30:.2f} GiB, "
              + ", ".join(f"{k} {v:.1f}" for k, v in {**r["stages"], **r["search_parts"]}.items())
              + f"; blocks {r['blocks']}, {r['decisions']} checked", flush=True)
    fitted = fit(rows)
    print(table(fitted))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fit": fitted}, indent=2))


if __name__ == "__main__":
    main()
