"""Turning the core's progress callbacks into a readable stage-by-stage status (Markdown).

The quantization core reports ``(stage, fraction, message)`` with stages "calibration",
"init", "veo", "entropy", "search", "done" (and the evaluator "eval"). The status shows each
stage seen so far as finished or running, with its latest message ("VEO epoch 3/10",
"block 2 of 4"), so a student can follow what Q-VLM is doing while it runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from qvlm.ui.jobs import ProgressEvent

STAGE_TITLES = {
    "load": "load model",
    "calibration": "calibration: record FP activations",
    "init": "init ranges (lp clipping, QLoRA-style)",
    "veo": "VEO: optimize vision-encoder quantizers",
    "entropy": "entropy D(k,k+1) between decoder layers",
    "search": "block-wise percentile search",
    "done": "finish: measure per-layer errors",
    "eval": "easy-VQA evaluation",
    "ded": "DED: layer-wise vs joint search, per sample",
}


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar; Markdown-safe and readable in a screenshot."""
    f = min(1.0, max(0.0, fraction))
    full = round(f * width)
    return "█" * full + "░" * (width - full) + f" {100 * f:3.0f}%"


@dataclass
class StageTracker:
    """The latest (fraction, message) of every stage, in the order stages first appeared."""

    title: str
    stages: dict[str, tuple[float, str]] = field(default_factory=dict)
    current: str | None = None
    started: float = field(default_factory=time.monotonic)
    note: str = ""
    spans: dict[str, list[float]] = field(default_factory=dict)  # stage -> [first event, last handover]

    def update(self, events: Iterable[ProgressEvent]) -> None:
        for e in events:
            if self.current is not None and e.stage != self.current and self.current in self.stages:
                _, msg = self.stages[self.current]
                self.stages[self.current] = (1.0, msg)  # a stage that hands over is finished
                self.spans[self.current][1] = e.at
            self.stages[e.stage] = (e.fraction, e.message)
            span = self.spans.setdefault(e.stage, [e.at, e.at])
            span[1] = e.at
            self.current = e.stage

    def seconds(self, stage: str) -> float:
        """How long a stage has taken (so far): where a student sees the time go."""
        first, last = self.spans.get(stage, (0.0, 0.0))
        end = time.monotonic() if stage == self.current else last
        return max(0.0, end - first)

    @property
    def overall(self) -> tuple[str, float, str]:
        """(stage, fraction, message) of the running stage, for ``gr.Progress``."""
        if self.current is None:
            return ("starting", 0.0, "")
        fraction, message = self.stages[self.current]
        return (self.current, fraction, message)

    def markdown(self, final: str | None = None) -> str:
        elapsed = time.monotonic() - self.started
        lines = [f"**{self.title}** · {elapsed:.1f} s"]
        if self.note:
            lines.append(f"> {self.note}")
        if not self.stages and final is None:
            lines.append("- starting…")
        for stage, (fraction, message) in self.stages.items():
            if stage == "done" and final is not None:
                continue
            running = stage == self.current and final is None
            icon = "▶" if running else "✓"
            shown = fraction if running else 1.0
            lines.append(f"- {icon} **{STAGE_TITLES.get(stage, stage)}** `{bar(shown)}` {message} "
                         f"· {self.seconds(stage):.1f} s")
        if final:
            lines.append("")
            lines.append(final)
        return "\n".join(lines)
