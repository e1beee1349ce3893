"""Run sizes (how many calibration pairs and VEO epochs a Start uses) and the expected time of a run.

The expected time is read from measured per-stage seconds (``run_costs.json`` beside this file,
written by ``benchmarks/run_costs.py``); where the form departs from a measured point it is scaled
linearly in ``calib_size`` and ``veo_epochs`` and said to be "about". A model x recipe never
measured is told so: no time is ever guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlm.quant import QuantConfig

RUN_COSTS = Path(__file__).with_name("run_costs.json")
"""Measured per-stage seconds per bundled model x recipe x run size (W4A4); absent until measured."""


@dataclass(frozen=True)
class RunSize:
    """A named pair of (calibration pairs, VEO epochs): the two numbers that set a run's length."""

    name: str
    calib_size: int
    veo_epochs: int
    description: str


_PAPER = QuantConfig()
RUN_SIZES: dict[str, RunSize] = {s.name: s for s in (
    # 16 pairs, 2 epochs, from benchmarks/results/bench.json (64 pairs, 10 epochs, W4A4, 2-core CPU): the
    # stages besides VEO took 8.4 s (easy-VQA model) and 52.6 s (mosaic model) and grow with the pairs, VEO
    # took 22 s and 109 s and grows with pairs x epochs (plus a held-out check per epoch), so a quarter of
    # the pairs and a fifth of the epochs end a qvlm Start in about 10 s and well within 60 s.
    RunSize("quick", 16, 2, "16 calibration pairs, 2 VEO epochs: seconds on the bundled models"),
    RunSize("paper", _PAPER.calib_size, _PAPER.veo_epochs,
            f"{_PAPER.calib_size} calibration pairs, {_PAPER.veo_epochs} VEO epochs: the paper's run (§4.1)"),
)}
"""The app's run sizes, the default (``quick``) first; ``paper`` reads QuantConfig's own defaults."""
DEFAULT_RUN_SIZE = "quick"


def read_costs(path: Path = RUN_COSTS) -> dict[str, Any]:
    """The measured costs file as a dict; an empty one when it does not exist yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _stage_seconds(timings: dict[str, float], point: dict[str, Any], calib_size: int, veo_epochs: int) -> float:
    """The measured stages' seconds scaled from the measured point to this calib_size and veo_epochs."""
    pairs = calib_size / point["calib_size"]
    total = 0.0
    for stage, seconds in timings.items():
        if stage == "total":
            continue
        if stage == "veo":
            total += seconds * pairs * (veo_epochs / point["veo_epochs"]) if point["veo_epochs"] else 0.0
        else:
            total += seconds * pairs
    return total


def expected_time(model: str, recipe: str, run_size: str, calib_size: int, veo_epochs: int,
                  costs: dict[str, Any] | None = None) -> str:
    """"Expected time: 9.8 s (measured ...)", "about 12 s (scaled from ...)" or "no measurement yet".

    ``model``: the bundled model's short name ("tiny-llava-easyvqa"). The entry of the chosen run size
    is used when there is one, else the other measured size of the same model and recipe.
    """
    costs = read_costs() if costs is None else costs
    if recipe == "fp":
        return "Expected time: none, the full-precision recipe quantizes nothing."
    points = [r for r in costs.get("runs", []) if r["model"] == model and r["recipe"] == recipe]
    points.sort(key=lambda r: r["run_size"] != run_size)
    if not points:
        return f"Expected time: no measurement yet for {model} with {recipe} (`python benchmarks/run_costs.py`)."
    point = points[0]
    if point["veo_epochs"] == 0 and veo_epochs and "veo" in point["timings"]:
        return f"Expected time: no measurement yet for {model} with {recipe} and VEO epochs."
    seconds = _stage_seconds(point["timings"], point, calib_size, veo_epochs)
    where = f"{costs.get('machine', 'an unnamed machine')}, {costs.get('threads', '?')} thread(s), {costs.get('date', '?')}"
    if (point["calib_size"], point["veo_epochs"]) == (calib_size, veo_epochs):
        return f"Expected time: {seconds:.0f} s of quantization (measured: {where})."
    return (f"Expected time: about {seconds:.0f} s of quantization (scaled from {point['calib_size']} pairs and "
            f"{point['veo_epochs']} VEO epochs measured on {where}).")
