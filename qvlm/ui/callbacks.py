"""The panels' event handlers, as one :class:`Controller` holding the app's server-side state.

Each panel's handlers live in their own module (``panel_quantize``, ``panel_analysis``,
``panel_ask``, ``panel_results``) as a mixin; the controller adds the shared state: settings,
the per-session variant stores, the FP model cache and the example images.

Rules every handler follows, so that bad input never costs the user what they computed:
- a problem the user can fix is reported with ``gr.Warning`` *and* in the panel's status
  text (a toast alone is easy to miss and absent from API calls); the other outputs are
  left untouched with ``gr.skip()``;
- an unexpected exception is logged with its traceback on the server and shown as one line;
- long jobs (quantize, DED, evaluate) stream a stage-by-stage status, can be cancelled, and
  are serialized across sessions by :data:`~qvlm.ui.jobs.HEAVY_WORK` with a "waiting" message.

Handlers can be called directly (tests pass ``request=None`` or any object with a
``session_hash``), which is how the API tests exercise each panel.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import gradio as gr

from qvlm.ui import quant_bridge as qb  # noqa: F401 - tests patch the core through callbacks.qb
from qvlm.ui.feedback import log
from qvlm.ui.images import load_user_image
from qvlm.ui.model_cache import ModelCache
from qvlm.ui.panel_analysis import AnalysisPanel
from qvlm.ui.panel_ask import AskPanel
from qvlm.ui.panel_quantize import QuantizePanel
from qvlm.ui.panel_results import EVAL_COLUMNS, ResultsPanel  # noqa: F401 - re-exported for the layout
from qvlm.ui.settings import EXAMPLES_DIR, Settings
from qvlm.ui.state import SessionRegistry, SessionState


class Controller(QuantizePanel, AnalysisPanel, AskPanel, ResultsPanel):
    """The app's server-side state (sessions, FP models) and every panel's handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionRegistry(settings.max_sessions, settings.max_variants, settings.variant_budget_bytes)
        self.models = ModelCache(settings.allowed_roots, settings.memory_budget_bytes)
        self.examples = _load_examples()
        self._preloaded = not settings.preload
        self._preload_lock = threading.Lock()

    # ------------------------------------------------------------------ sessions
    def session(self, request: Any) -> SessionState:
        sid = getattr(request, "session_hash", None) or "default"
        return self.sessions.get(sid)

    def drop_session(self, request: gr.Request | None = None) -> None:
        """Tab closed: forget the session's variants (cancelling its job, if any)."""
        sid = getattr(request, "session_hash", None)
        if sid:
            self.sessions.drop(sid)

    def preload(self) -> None:
        """Load the default FP model in the background so the first click does not wait for it.

        Called on the first page view, not at build time: while ``launch()`` starts, Gradio probes
        its own URL with a 3 s timeout and gives up on the first miss, and a model load competing
        for 2 busy cores can make it miss.
        """
        with self._preload_lock:
            if self._preloaded:
                return
            self._preloaded = True

        def run() -> None:
            try:
                fp = self.models.get(self.settings.default_model)
                images = self.examples.get("images", [])
                if images:  # one tiny generation warms up the kernels: the first real answer is not 10x slower
                    img, _ = load_user_image(str(EXAMPLES_DIR / images[0]["file"]))
                    self._answer_card("warm-up", "fp", fp, img, images[0]["questions"][0]["question"])
            except Exception:  # noqa: BLE001 - reported when the user actually uses it
                log.warning("preloading %s failed", self.settings.default_model, exc_info=True)

        threading.Thread(target=run, daemon=True, name="qvlm-preload").start()


def _load_examples() -> dict[str, Any]:
    """The bundled example images and questions (assets/examples/examples.json)."""
    try:
        meta = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    except (OSError, ValueError):
        log.warning("no example images found in %s", EXAMPLES_DIR)
        return {"images": [], "generic_questions": [], "by_file": {}}
    meta["by_file"] = {img["file"]: int(img["image_id"]) for img in meta.get("images", [])}
    return meta


__all__ = ["Controller", "EVAL_COLUMNS"]
