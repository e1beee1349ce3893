"""How handlers talk back: a warning that shows as a toast *and* in the status text, and one line
for an unexpected error (its traceback goes to the server log).

A problem the user can fix is reported with both, because a toast alone is easy to miss and
absent from API calls; the handler leaves every other output as it was, so bad input never costs
the user what they computed.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from gradio.components import Component

log = logging.getLogger("qvlm.ui")

Outputs = dict[Component, Any]
"""A handler's return value: only the components it changes, keyed by component (the others stay)."""


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
