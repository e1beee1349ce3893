"""Per-stage seconds of a W4A4 run of each bundled model x recipe x run size, for the Quantize tab's expected time.

Each run is one :func:`qvlm.quant.quantize` with the run size's calibration pairs and VEO epochs
(:data:`qvlm.ui.run_size.RUN_SIZES`); its ``QuantResult.timings`` (seconds per stage) are stored with
the machine, the torch threads and the date in ``qvlm/ui/run_costs.json``, which the app reads
(:func:`qvlm.ui.run_size.expected_time`). The model load is not timed: the app keeps models loaded.

    python benchmarks/run_costs.py [--models bundled mosaic] [--recipes qvlm rtn ...] [--sizes quick paper]
                                   [--threads 2] [--out qvlm/ui/run_costs.json]

Run it on an otherwise idle machine with the threads the app will have. Entries of ``--out`` that this run does
not measure are kept (each entry carries its date), so one recipe can be re-measured after a change to it; a
selection into another ``--out`` file is a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlm.models import BUNDLED_MODELS, SHORT_NAMES, load_vlm  # noqa: E402
from qvlm.quant import MENU_ORDER, QuantConfig, quantize  # noqa: E402
from qvlm.ui.run_size import RUN_COSTS, RUN_SIZES  # noqa: E402

BITS = "W4A4"


def measure(model: str, recipe: str, size: str) -> dict:
    """One run's record: what ran and its seconds per stage."""
    handle = load_vlm(BUNDLED_MODELS[SHORT_NAMES[model]])
    run = RUN_SIZES[size]
    cfg = QuantConfig.from_bits(BITS, recipe=recipe, calib_size=run.calib_size, veo_epochs=run.veo_epochs)
    result = quantize(handle, cfg)
    return {"model": BUNDLED_MODELS[SHORT_NAMES[model]].name, "recipe": recipe, "run_size": size, "bits": BITS,
            "calib_size": run.calib_size, "veo_epochs": run.veo_epochs,
            "timings": {k: round(v, 3) for k, v in result.timings.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["bundled", "mosaic"], choices=sorted(SHORT_NAMES))
    parser.add_argument("--recipes", nargs="+", default=list(MENU_ORDER), choices=list(MENU_ORDER))
    parser.add_argument("--sizes", nargs="+", default=list(RUN_SIZES), choices=list(RUN_SIZES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the app's CPU)")
    parser.add_argument("--out", type=Path, default=RUN_COSTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for model in args.models:
        for recipe in args.recipes:
            for size in args.sizes:
                runs.append(measure(model, recipe, size))
                print(json.dumps(runs[-1]), flush=True)
    today = datetime.date.today().isoformat()
    for run in runs:
        run["date"] = today
    measured = {(r["model"], r["recipe"], r["run_size"]) for r in runs}
    kept = []  # the file's other entries (a recipe not re-measured this time keeps its figures and its date)
    if args.out.exists():
        kept = [r for r in json.loads(args.out.read_text()).get("runs", [])
                if (r["model"], r["recipe"], r["run_size"]) not in measured]
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
              "threads": args.threads, "torch": torch.__version__, "date": today, "runs": kept + runs}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
