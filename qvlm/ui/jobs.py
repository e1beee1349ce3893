"""Long jobs (quantize, DED, evaluate): one helper waits for the CPU, runs the work in a worker
thread, streams its stages as Markdown, and cleans up on any exit.

The core reports progress through a plain ``(stage, fraction, message)`` callback. A Gradio
handler that *streams* a status must be a generator that yields between steps, so the work runs
in a worker thread and the handler polls its latest progress. One process-wide
:data:`HEAVY_WORK` lock serializes long jobs across sessions: on 2 CPU cores two at once would
each run at half speed and double the memory, and the waiting session is told why it waits.

A panel describes its job as a :class:`LongJob` (its work function and its final render) and
hands it to :func:`stream_job`; everything else is written once, here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gradio.components import Component

from qvlm.utils.progress import (
    STAGE_CALIBRATION,
    STAGE_DED,
    STAGE_ENTROPY,
    STAGE_EVAL,
    STAGE_INIT,
    STAGE_LOAD,
    STAGE_MEASURE,
    STAGE_MODALITY,
    STAGE_SCAN,
    STAGE_SEARCH,
    STAGE_SWEEP,
    STAGE_VEO,
    Cancelled,
    ProgressCallback,
)
from qvlm.ui.feedback import Outputs, unexpected, warn
from qvlm.ui.state import SessionState

T = TypeVar("T")


# ---------------------------------------------------------------------------- the cross-session lock
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


# ---------------------------------------------------------------------------- the worker thread
@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    fraction: float
    message: str
    at: float


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


# ---------------------------------------------------------------------------- the stage-by-stage status
STAGE_TITLES = {
    STAGE_LOAD: "load model",
    STAGE_CALIBRATION: "calibration: record FP activations",
    STAGE_INIT: "init ranges (lp clipping, QLoRA-style)",
    STAGE_VEO: "VEO: optimize vision-encoder quantizers",
    STAGE_ENTROPY: "entropy D(k,k+1) between decoder layers",
    STAGE_SEARCH: "block-wise percentile search",
    STAGE_MEASURE: "finish: measure per-layer errors",
    STAGE_EVAL: "evaluation on the test split",
    STAGE_DED: "DED: layer-wise vs joint search, per sample",
    STAGE_SCAN: "answer test questions with FP and the variants",
    STAGE_SWEEP: "quantize and evaluate each bit-width",
    STAGE_MODALITY: "record |x| of image and text tokens per decoder layer",
}
"""How the status names each stage the core reports; a stage not listed is shown by its own name
(the evaluation reports one stage per model, named by the model's label)."""


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar; Markdown-safe and readable in a screenshot."""
    f = min(1.0, max(0.0, fraction))
    full = round(f * width)
    return "█" * full + "░" * (width - full) + f" {100 * f:3.0f}%"


@dataclass
class StageTracker:
    """The latest (fraction, message) of every stage, in the order stages first appeared.

    Shown as one line per stage, finished or running, with its latest message ("VEO epoch 3/10",
    "block 2 of 4") and its time, so a student can follow what Q-VLM is doing while it runs.
    A stage counts as finished when it reports fraction 1.0 (the core's contract: 1.0 only once its work is
    done), when its successor reports, or when the run ends with a result: a cancelled or failed run shows its
    last stage where it stopped, never at 100%.
    """

    title: str
    stages: dict[str, tuple[float, str]] = field(default_factory=dict)
    current: str | None = None
    started: float = field(default_factory=time.monotonic)
    note: str = ""
    spans: dict[str, list[float]] = field(default_factory=dict)  # stage -> [start, its latest event]
    last_event: float | None = None

    def update(self, events: Iterable[ProgressEvent]) -> None:
        """Take the worker's new events. A stage starts when the one before it last reported.

        Why not at its own first event: the core reports a stage after a unit of its work (a layer,
        an epoch), so that work, and any set-up before it, belongs to the new stage, not the old one.
        """
        for e in events:
            if e.stage not in self.spans:
                self.spans[e.stage] = [e.at if self.last_event is None else self.last_event, e.at]
            self.stages[e.stage] = (e.fraction, e.message)
            self.spans[e.stage][1] = e.at
            self.current, self.last_event = e.stage, e.at

    def seconds(self, stage: str, running: bool = False) -> float:
        """How long a stage has taken (so far, when ``running``): where a student sees the time go."""
        first, last = self.spans.get(stage, (0.0, 0.0))
        return max(0.0, (time.monotonic() if running else last) - first)

    def markdown(self, final: str | None = None, completed: bool = False) -> str:
        """The status: title and elapsed time, an optional note, one line per stage, then ``final``.

        ``completed``: the run ended with a result, so its last stage is finished too; otherwise a
        ``final`` line (cancel, error) leaves the last stage marked stopped at the fraction it reached.
        """
        elapsed = time.monotonic() - self.started
        lines = [f"**{self.title}** · {elapsed:.1f} s"]
        if self.note:
            lines.append(f"> {self.note}")
        if not self.stages and final is None:
            lines.append("- starting…")
        for stage, (fraction, message) in self.stages.items():
            if stage == STAGE_MEASURE and final is not None:
                continue
            last = stage == self.current
            finished = not last or completed or fraction >= 1.0  # 1.0 is the core's "this stage is done"
            if finished:
                icon, shown = "✓", 1.0
            elif final is None:
                icon, shown = "▶", fraction
            else:
                icon, shown, message = "■", fraction, f"{message} · stopped here".lstrip(" ·")
            lines.append(f"- {icon} **{STAGE_TITLES.get(stage, stage)}** `{bar(shown)}` {message} "
                         f"· {self.seconds(stage, running=not finished and final is None):.1f} s")
        if final:
            lines.append("")
            lines.append(final)
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the one long-job helper
@dataclass
class LongJob(Generic[T]):
    """What a panel says about one long job; :func:`stream_job` does the rest."""

    name: str
    """What the session is busy with ("quantization"): the "already running a ..." message."""
    title: str
    """The status heading, e.g. "Quantizing tiny-llava-easyvqa W4A4 qvlm (16 calibration pairs)"."""
    holder: str
    """What another session is told it waits for, e.g. "a quantization (tiny-llava-easyvqa W4A4 qvlm)"."""
    work: Callable[[ProgressCallback, threading.Event], T]
    """``work(progress, cancel)``, run in the worker thread; raises ``Cancelled`` when cancelled."""
    render: Callable[[T, float], tuple[str, Outputs]]
    """``render(result, seconds)`` -> (the status's last line, the other outputs that change)."""
    cancelled: str = "■ Cancelled."
    """The status's last line after a cancel: say what the user still has."""
    stopped: Callable[[], Outputs] = dict
    """The outputs to refresh when the job ends without a result (refused, cancelled or failed)."""


def stream_job(job: LongJob[T], session: SessionState, status: Component) -> Iterator[Outputs]:
    """Run ``job`` for ``session``, yielding ``{status: markdown}`` while it runs and the render at the end.

    One job per session (a double click is refused); one long job at a time across sessions
    (:data:`HEAVY_WORK`), with a "waiting" status meanwhile. Whatever ends it (done, an error, a
    cancel, a closed tab, which closes this generator) stops the worker and frees the lock, so no
    run outlives its page. A ``ValueError`` (bad input, a model that cannot load) is shown as a
    warning; anything else as one unexpected-error line, with the traceback in the server log.
    """
    if not session.begin(job.name):
        yield {status: warn(f"This session is already running a {session.busy}; wait for it or press Cancel."),
               **job.stopped()}
        return
    tracker = StageTracker(job.title)
    worker: BackgroundJob[T] | None = None
    locked = False
    try:
        while not (locked := HEAVY_WORK.acquire(job.holder, timeout=0.5)):
            if session.cancel.is_set():
                yield {status: tracker.markdown("■ Cancelled while waiting; nothing was started."), **job.stopped()}
                return
            tracker.note = (f"Waiting: another session is running {HEAVY_WORK.describe()}. Jobs run one at a time "
                            "on this CPU; yours starts when it finishes (or press Cancel).")
            yield {status: tracker.markdown()}
        tracker.note = ""
        worker = BackgroundJob(lambda progress: job.work(progress, session.cancel)).start()
        for events in worker.poll():
            tracker.update(events)
            yield {status: tracker.markdown()}
        result = worker.outcome()
    except Cancelled:
        yield {status: tracker.markdown(job.cancelled), **job.stopped()}
        return
    except ValueError as err:  # ModelLoadError and the config's own checks are ValueErrors with a message
        yield {status: tracker.markdown(warn(str(err))), **job.stopped()}
        return
    except MemoryError as err:
        yield {status: tracker.markdown(warn(f"Out of memory during the {job.name} ({err}); try a smaller model "
                                             "or fewer samples.")), **job.stopped()}
        return
    except Exception as err:  # noqa: BLE001 - shown as one line, logged with its traceback
        yield {status: tracker.markdown(unexpected(job.name[:1].upper() + job.name[1:], err)), **job.stopped()}
        return
    finally:
        _stop(session, worker, locked)
    line, outputs = job.render(result, worker.elapsed)
    yield {status: tracker.markdown(line, completed=True), **outputs}


def _stop(session: SessionState, worker: BackgroundJob | None, locked: bool) -> None:
    """Stop the worker if it still runs and wait for it, free the cross-session lock, end the session's job."""
    if worker is not None and not worker.done:
        session.cancel.set()
        try:
            worker.outcome()
        except BaseException:  # noqa: BLE001 - stream_job already reported the real outcome
            pass
    if locked:
        HEAVY_WORK.release()
    session.end()
