"""The attributes the panel mixins share (settings, sessions, FP models, examples)."""

from __future__ import annotations

from typing import Any

from qvlm.ui.model_cache import ModelCache
from qvlm.ui.settings import Settings
from qvlm.ui.state import SessionRegistry, SessionState


class PanelBase:
    """What every panel's handlers use; :class:`~qvlm.ui.callbacks.Controller` provides it."""

    settings: Settings
    sessions: SessionRegistry
    models: ModelCache
    examples: dict[str, Any]

    def session(self, request: Any) -> SessionState:  # pragma: no cover - implemented by Controller
        raise NotImplementedError
