"""Running a long computation in a worker thread while a Gradio generator reports its progress.

The quantization core reports progress through a plain ``(stage, fraction, message)``
callback. A Gradio handler that wants to *stream* a status display must be a generator that
yields between steps, so the core runs in a worker thread and the handler polls the
latest progress. One process-wide :data:`HEAVY_WORK` lock serializes quantizations and
evaluations across sessions: on 2 CPU cores two of them at once would each run at half
speed and double the memory, and the waiting session is told why it waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from qvlm.progress import ProgressCallback

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    fraction: float
    message: str
    at: float


class HeavyWorkLock:
    """A lock that remembers who holds it, so a waiting session can be told what it waits for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: str | None = None
        self.since: float = 0.0

    def acquire(self, what: str, timeout: float) -> bool:
        if self._lock.acquire(timeout=timeout):
            self.holder, self.since = what, time.monotonic()
            return True
        return False

    def release(self) -> None:
        self.holder = None
        self._lock.release()

    def describe(self) -> str:
        holder = self.holder or "another job"
        return f"{holder} (running for {time.monotonic() - self.since:.0f} s)"

    def locked(self) -> bool:
        return self._lock.locked()


HEAVY_WORK = HeavyWorkLock()


class HeavyWorkTurn:
    """Wait for :data:`HEAVY_WORK` inside a streaming handler: iterate it to get status texts.

    Why a class: the handler must re-yield each status in its own output tuple and then learn
    whether it got the lock or was cancelled while waiting (``acquired``); the three long
    callbacks (quantize, evaluate, DED) share this loop instead of writing it each.
    ``tracker`` is a :class:`qvlm.ui.progress_view.StageTracker` (``note`` and ``markdown``).
    """

    def __init__(self, what: str, tracker, cancel: threading.Event, waiting_tail: str = "",
                 cancelled_message: str = "■ Cancelled while waiting.") -> None:
        self.what, self.tracker, self.cancel = what, tracker, cancel
        self.waiting_tail, self.cancelled_message = waiting_tail, cancelled_message
        self.acquired = False

    def __iter__(self) -> Iterator[str]:
        while not HEAVY_WORK.acquire(self.what, timeout=0.5):
            if self.cancel.is_set():
                yield self.tracker.markdown(self.cancelled_message)
                return
            self.tracker.note = f"Waiting: another session is running {HEAVY_WORK.describe()}{self.waiting_tail}"
            yield self.tracker.markdown()
        self.tracker.note = ""
        self.acquired = True


class BackgroundJob(Generic[T]):
    """``fn(progress)`` in a daemon thread; :meth:`poll` yields progress until it finishes.

    The result (or the exception the function raised) is kept for :meth:`outcome`, so the
    caller decides how to present a failure: the thread never lets one escape unseen.
    """

    def __init__(self, fn: Callable[[ProgressCallback], T]) -> None:
        self._fn = fn
        self._events: list[ProgressEvent] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qvlm-job")

    def start(self) -> BackgroundJob[T]:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _progress(self, stage: str, fraction: float, message: str) -> None:
        with self._lock:
            self._events.append(ProgressEvent(stage, float(fraction), str(message), time.monotonic()))

    def _run(self) -> None:
        try:
            self._result = self._fn(self._progress)
        except BaseException as err:  # noqa: BLE001 - handed to the caller through outcome()
            self._error = err
        finally:
            self._done.set()

    def poll(self, interval: float = 0.3) -> Iterator[list[ProgressEvent]]:
        """Yield the new progress events every ``interval`` seconds, then once more when done."""
        seen = 0
        while True:
            finished = self._done.wait(interval)
            with self._lock:
                new, seen = self._events[seen:], len(self._events)
            yield new
            if finished:
                return

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def outcome(self) -> T:
        """The function's result; re-raises its exception."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]
