"""Per-browser-session state: the quantized variants a session holds, bounded by an LRU.

Quantized models are large Python objects (torch modules), so they live server-side in a
:class:`SessionRegistry` keyed by Gradio's ``session_hash`` rather than inside ``gr.State``
(which would deep-copy them). Two bounds keep a public Space alive: each session holds at
most ``max_variants`` variants within ``budget_bytes`` (least recently used dropped first,
and the caller is told which, so the UI can say so), and at most ``max_sessions`` sessions
keep anything (the longest idle one is dropped first). No gradio import here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


def module_bytes(model: Any) -> int:
    """Bytes held by a torch module's parameters and buffers (what a variant costs in RAM)."""
    total = 0
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class Variant:
    """One quantized model held by a session, and everything computed from it (kept with it)."""

    key: str
    label: str
    base_model: str
    result: Any  # qvlm.quant.QuantResult
    nbytes: int
    seconds: float
    created: float = field(default_factory=time.time)
    evals: dict[tuple[int, int], Any] = field(default_factory=dict)  # (n questions, seed) -> EvalResult
    analyses: dict[int, dict[int, Any]] = field(default_factory=dict)  # n_samples -> {layer: DEDAnalysis}
    memory: dict[str, Any] | None = None

    @property
    def handle(self) -> Any:
        return self.result.handle


class VariantStore:
    """An LRU of variants with a count bound and a byte bound; thread-safe.

    ``add`` returns the variants it evicted. The newest variant is never evicted by its own
    insertion, even when it alone exceeds the byte budget: dropping the run the user just
    waited for would be worse than going over a soft bound.
    """

    def __init__(self, max_variants: int = 4, budget_bytes: int = 2 * 2**30) -> None:
        self.max_variants = max(1, max_variants)
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, Variant] = OrderedDict()
        self._lock = threading.RLock()

    def add(self, variant: Variant) -> list[Variant]:
        with self._lock:
            self._items.pop(variant.key, None)
            self._items[variant.key] = variant
            evicted = []
            while len(self._items) > 1 and (
                len(self._items) > self.max_variants or self.total_bytes() > self.budget_bytes
            ):
                _, old = self._items.popitem(last=False)
                evicted.append(old)
            return evicted

    def get(self, key: str, touch: bool = True) -> Variant | None:
        with self._lock:
            v = self._items.get(key)
            if v is not None and touch:
                self._items.move_to_end(key)
            return v

    def find_label(self, label: str) -> Variant | None:
        with self._lock:
            return next((v for v in self._items.values() if v.label == label), None)

    def remove(self, key: str) -> Variant | None:
        with self._lock:
            return self._items.pop(key, None)

    def labels(self) -> list[str]:
        """Oldest first, which is also the order the user made them in (unless reused since)."""
        with self._lock:
            return [v.label for v in self._items.values()]

    def variants(self, base_model: str | None = None) -> list[Variant]:
        with self._lock:
            return [v for v in self._items.values() if base_model is None or v.base_model == base_model]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for v in self._items.values())

    def unique_label(self, label: str) -> str:
        """``label``, or ``label #2``, ``#3`` ... when a variant with another config already uses it."""
        with self._lock:
            taken = {v.label for v in self._items.values()}
            if label not in taken:
                return label
            i = 2
            while f"{label} #{i}" in taken:
                i += 1
            return f"{label} #{i}"

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SessionState:
    """What one browser session owns: its variants, FP evaluation results and a cancel switch."""

    variants: VariantStore
    fp_evals: dict[tuple[str, int, int], Any] = field(default_factory=dict)  # (model, n, seed) -> EvalResult
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: str | None = None  # "quantize" / "evaluate" while a job of this session runs
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, job: str) -> bool:
        """Mark a job as running; False when this session already runs one (double click, second tab)."""
        with self.lock:
            if self.busy is not None:
                return False
            self.busy = job
            self.cancel.clear()
            return True

    def end(self) -> None:
        with self.lock:
            self.busy = None


class SessionRegistry:
    """session_hash -> :class:`SessionState`, keeping at most ``max_sessions`` (idle ones dropped first)."""

    def __init__(self, max_sessions: int = 8, max_variants: int = 4, budget_bytes: int = 2 * 2**30) -> None:
        self.max_sessions = max(1, max_sessions)
        self.max_variants = max_variants
        self.budget_bytes = budget_bytes
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionState:
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None:
                state = SessionState(VariantStore(self.max_variants, self.budget_bytes))
                self._sessions[session_id] = state
                self._evict_idle(keep=session_id)
            self._sessions.move_to_end(session_id)
            state.touched = time.monotonic()
            return state

    def drop(self, session_id: str) -> None:
        """Forget a session (the browser tab closed): its variants become garbage."""
        with self._lock:
            state = self._sessions.pop(session_id, None)
        if state is not None:
            state.cancel.set()

    def _evict_idle(self, keep: str) -> None:
        for sid in list(self._sessions):
            if len(self._sessions) <= self.max_sessions:
                break
            if sid != keep and self._sessions[sid].busy is None:
                del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions
