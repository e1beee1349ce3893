"""Progress reporting and cancellation shared by every long-running stage.

The core never knows who listens: the UI maps the callback to ``gr.Progress``, the CLI to tqdm.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

ProgressCallback = Callable[[str, float, str], None]
"""``(stage, fraction in [0, 1], message)``."""


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Cancelled(RuntimeError):
    """Raised from inside a long loop when the user asked to stop."""


def check_cancel(cancel: CancelToken | threading.Event | None, what: str = "run") -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def report(progress: ProgressCallback | None, stage: str, fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(stage, max(0.0, min(1.0, fraction)), message)
