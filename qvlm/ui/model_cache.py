"""Full-precision models shared by all sessions, loaded once and kept read-only.

Every session asks the same FP model (quantization makes copies and never modifies it), so
one copy per model name serves everybody; a small LRU bounds how many distinct FP models a
public app keeps. Loading goes through :func:`qvlm.models.load_vlm` with the app's allow-list
and memory budget, so every refusal arrives as a :class:`~qvlm.models.ModelLoadError`
carrying a message for the user.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from qvlm.models import BUNDLED_MODEL_DIR, BUNDLED_MODEL_NAME, VLMHandle, load_vlm


def canonical_name(name: str) -> str:
    """One key per model: the bundled model has two spellings, folders are resolved."""
    text = (name or "").strip()
    if text in ("bundled", BUNDLED_MODEL_NAME):
        return BUNDLED_MODEL_NAME
    path = Path(text).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return BUNDLED_MODEL_NAME if resolved == BUNDLED_MODEL_DIR.resolve() else str(resolved)
    return text


class ModelCache:
    """name -> :class:`VLMHandle`, at most ``max_models`` at once; loads are serialized per cache."""

    def __init__(
        self, allowed_roots: list[Path], memory_budget_bytes: int | None = None, max_models: int = 2
    ) -> None:
        self.allowed_roots = allowed_roots
        self.memory_budget_bytes = memory_budget_bytes
        self.max_models = max(1, max_models)
        self._models: OrderedDict[str, VLMHandle] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> VLMHandle:
        """The loaded FP model; raises ModelLoadError (a ValueError) with a user-facing message."""
        key = canonical_name(name)
        with self._lock:
            handle = self._models.get(key)
            if handle is None:
                handle = load_vlm(key, allowed_roots=self.allowed_roots, memory_budget_bytes=self.memory_budget_bytes)
                self._models[key] = handle
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return handle

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
