"""What the app keeps between events: the shared FP models, the example images, and per-session variants.

:class:`AppState` is handed to every panel when it is built. Quantized models are large Python
objects (torch modules), so they live server-side in a :class:`SessionRegistry` keyed by Gradio's
``session_hash`` rather than inside ``gr.State`` (which would deep-copy them). Two bounds keep a
public Space alive: each session holds at most ``max_variants`` variants within ``budget_bytes``
(least recently used dropped first, and the caller is told which, so the UI can say so), and at
most ``max_sessions`` sessions keep anything (the longest idle one is dropped first).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from qvlm.export import load_model
from qvlm.models import VLMHandle
from qvlm.ui.feedback import log
from qvlm.ui.settings import EXAMPLES_DIR, Settings, bundled_display_name

SESSION_FOLDER_PREFIX = "qvlm-session-"
"""Every session's temporary folder is named so (:meth:`SessionState.files_dir`), which is how a new server
finds the folders of the sessions a stopped or killed one left behind (:func:`remove_stale_session_folders`)."""

RESTART_NOTICE = "⚠ The server restarted; variants from before are gone - quantize again."
"""What the page says when it was last shown by an earlier run of the server (:meth:`AppState.restart_notice`)."""


def session_files_root() -> Path:
    """The folder the session folders live in: Gradio's cache folder, which Gradio serves files from as they are
    (``GRADIO_TEMP_DIR``, else the system temporary folder's ``gradio``)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def remove_stale_session_folders(root: str | Path | None = None) -> int:
    """Delete every session folder under ``root`` (default :func:`session_files_root`); return how many went.

    Called once when the server starts, before any session exists: the folders found then belong to a
    previous run of the server (stopped or killed, so its sessions never ended), their variants are gone,
    and Gradio would still serve their files.
    """
    root = Path(root) if root is not None else session_files_root()
    stale = [p for p in root.glob(f"{SESSION_FOLDER_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        log.info("removed %d session folder(s) a previous run of the server left", len(stale))
    return len(stale)


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
    evals: dict[tuple[int, int], Any] = field(default_factory=dict)  # (n questions, seed) -> EvalResult
    analyses: dict[int, dict[int, Any]] = field(default_factory=dict)  # n_samples -> {layer: DEDAnalysis}
    interactions: dict[int, Any] = field(default_factory=dict)  # n_samples -> DependencyReport

    @property
    def handle(self) -> VLMHandle:
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

    def find_label(self, label: str | None) -> Variant | None:
        """The variant shown as ``label``; None for no label or one the LRU has dropped."""
        with self._lock:
            return next((v for v in self._items.values() if v.label == label), None)

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
    busy: str | None = None  # "quantization" / "evaluation" / "DED analysis" while a job of this session runs
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: Path | None = None  # this session's temporary folder (downloads), made on first use

    def files_dir(self, root: str | Path | None = None) -> Path:
        """This session's temporary folder, created under ``root`` on first use; :meth:`remove_files` deletes it.

        One folder per session, so that ending the session (tab closed, idle session evicted) removes
        every file it wrote, whatever wrote it.
        """
        with self.lock:
            if self.files is None or not self.files.is_dir():
                if root is not None:
                    Path(root).mkdir(parents=True, exist_ok=True)
                self.files = Path(tempfile.mkdtemp(prefix=SESSION_FOLDER_PREFIX, dir=root))
            return self.files

    def remove_files(self) -> None:
        """Delete the session's temporary folder and everything in it (nothing when it has none)."""
        with self.lock:
            folder, self.files = self.files, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

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
            self._sessions.move_to_end(session_id)  # the registry's order is its idleness order
            return state

    def drop(self, session_id: str) -> None:
        """Forget a session (the browser tab closed): its variants become garbage, its temporary files go."""
        with self._lock:
            state = self._sessions.pop(session_id, None)
        if state is not None:
            state.cancel.set()
            state.remove_files()

    def _evict_idle(self, keep: str) -> None:
        for sid in list(self._sessions):
            if len(self._sessions) <= self.max_sessions:
                break
            if sid != keep and self._sessions[sid].busy is None:
                self._sessions.pop(sid).remove_files()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions


def canonical_name(name: str) -> str:
    """One key per model: every spelling of a bundled model is its display name, other folders are resolved."""
    text = (name or "").strip()
    bundled = bundled_display_name(text)
    if bundled:
        return bundled
    path = Path(text).expanduser()
    return str(path.resolve()) if text and path.is_dir() else text


class ModelCache:
    """name -> FP :class:`VLMHandle` shared by all sessions, at most ``max_models`` at once.

    Every session asks the same FP model (quantization makes copies and never modifies it), so
    one read-only copy per model name serves everybody. Loading goes through
    :func:`qvlm.export.load_model` (a checkpoint or a packed export) with the app's allow-list and memory budget, so every refusal
    arrives as a :class:`~qvlm.models.ModelLoadError` carrying a message for the user. Loads are
    serialized: two sessions asking for the same new model load it once.
    """

    def __init__(self, allowed_roots: list[Path], memory_budget_bytes: int | None = None, max_models: int = 2) -> None:
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
                handle = load_model(key, allowed_roots=self.allowed_roots,
                                            memory_budget_bytes=self.memory_budget_bytes)
                self._models[key] = handle
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return handle


def load_examples() -> dict[str, Any]:
    """The bundled example images and questions (assets/examples/examples.json)."""
    try:
        meta = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    except (OSError, ValueError):
        log.warning("no example images found in %s", EXAMPLES_DIR)
        return {"images": [], "generic_questions": []}
    return meta


@dataclass
class AppState:
    """What every panel shares, handed to each when it is built: settings, sessions, FP models, examples."""

    settings: Settings
    sessions: SessionRegistry
    models: ModelCache
    examples: dict[str, Any]
    server_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """New each time the server starts; the page keeps the one it last saw (:meth:`restart_notice`)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> AppState:
        return cls(
            settings=settings,
            sessions=SessionRegistry(settings.max_sessions, settings.max_variants, settings.variant_budget_bytes),
            models=ModelCache(settings.allowed_roots, settings.memory_budget_bytes),
            examples=load_examples(),
        )

    def session(self, request: Any) -> SessionState:
        """The caller's session; direct calls (tests, scripts) pass None or any object with a ``session_hash``."""
        sid = getattr(request, "session_hash", None) or "default"
        return self.sessions.get(sid)

    def cancel(self, request: gr.Request | None = None) -> None:
        """Ask the session's running job to stop at its next check (the job itself reports that it stopped).

        The switch is set even when nothing runs yet, so a job still waiting for the CPU gives up too.
        """
        session = self.session(request)
        session.cancel.set()
        gr.Info(f"Cancelling the {session.busy}…" if session.busy else "Nothing is running in this session.")

    def restart_notice(self, seen_server: str | None) -> tuple[Any, str]:
        """On page load: :data:`RESTART_NOTICE` for the Quantize status when the browser last saw another run of
        the server (its variants died with it), else no change; and this server's id for the browser to keep.

        Why the browser keeps the id: after a restart every session is new to the server, so only the page
        can tell "first visit" from "the server lost what I had".
        """
        restarted = bool(seen_server) and seen_server != self.server_id
        return (RESTART_NOTICE if restarted else gr.skip()), self.server_id

    def drop_session(self, request: gr.Request | None = None) -> None:
        """Tab closed: forget the session's variants (cancelling its job, if any) and remove its temporary files."""
        sid = getattr(request, "session_hash", None)
        if sid:
            self.sessions.drop(sid)
