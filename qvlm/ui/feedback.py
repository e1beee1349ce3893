"""How handlers talk back: a warning that shows as a toast *and* in the status text, one line
for an unexpected error (traceback in the server log), and the common end of every long job.

Shared by the panel modules so each reports problems the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from qvlm.ui.jobs import HEAVY_WORK, BackgroundJob
from qvlm.ui.state import SessionState

log = logging.getLogger("qvlm.ui")

SKIP = gr.skip
"""Leave an output as it is: what a handler returns for outputs a problem must not wipe."""


def warn(message: str) -> str:
    """Toast + the same text for the status box (returned), so API callers see it too."""
    gr.Warning(message)
    return f"⚠ {message}"


def unexpected(what: str, err: BaseException) -> str:
    """One line for the user; the traceback goes to the server log."""
    log.exception("%s failed", what)
    message = f"{what} failed unexpectedly: {type(err).__name__}: {err}. Nothing you computed before was lost."
    gr.Warning(message)
    return f"✗ {message}"


def image_path(value: Any) -> Any:
    """The file path of an image input, which arrives un-preprocessed (a FileData dict) or as a path."""
    if isinstance(value, dict):
        return value.get("path") or None
    return value


def end_heavy_work(session: SessionState, job: BackgroundJob | None, locked: bool) -> None:
    """Whatever ended a long callback (done, error, cancel, a closed tab): stop its worker thread,
    wait for it, and free the cross-session lock, so no run outlives its page."""
    if job is not None and not job.done:
        session.cancel.set()
        try:
            job.outcome()
        except BaseException:  # noqa: BLE001 - the callback already reported the real outcome
            pass
    if locked:
        HEAVY_WORK.release()
    session.end()
