"""Session state: the LRU variant store and the session registry (no gradio, no model)."""

from __future__ import annotations

import threading
import time

import torch

from qvlm.ui.jobs import BackgroundJob, HeavyWorkLock, ProgressEvent, StageTracker
from qvlm.ui.state import SessionRegistry, Variant, VariantStore, module_bytes


def _variant(key: str, nbytes: int = 100) -> Variant:
    return Variant(key=key, label=key, base_model="m", result=None, nbytes=nbytes, seconds=1.0)


def test_store_evicts_least_recently_used_by_count():
    store = VariantStore(max_variants=2, budget_bytes=10**9)
    assert store.add(_variant("a")) == []
    assert store.add(_variant("b")) == []
    store.get("a")  # a is now more recent than b
    evicted = store.add(_variant("c"))
    assert [v.key for v in evicted] == ["b"]
    assert store.labels() == ["a", "c"]


def test_store_evicts_by_bytes_but_never_the_newest():
    store = VariantStore(max_variants=10, budget_bytes=250)
    store.add(_variant("a", 100))
    store.add(_variant("b", 100))
    evicted = store.add(_variant("c", 100))
    assert [v.key for v in evicted] == ["a"] and store.total_bytes() == 200
    evicted = store.add(_variant("huge", 1000))  # alone over budget: kept, everything else dropped
    assert store.labels() == ["huge"] and {v.key for v in evicted} == {"b", "c"}


def test_store_same_key_replaces_and_labels_are_unique():
    store = VariantStore()
    store.add(_variant("a"))
    assert store.add(_variant("a")) == [] and len(store) == 1
    assert store.unique_label("a") == "a #2"
    assert store.unique_label("b") == "b"


def test_registry_isolates_sessions_and_drops_idle_ones_first():
    reg = SessionRegistry(max_sessions=2)
    s1 = reg.get("one")
    s1.variants.add(_variant("x"))
    assert reg.get("two").variants.labels() == []
    s1.begin("quantize")  # busy sessions are not evicted
    reg.get("three")
    assert "one" in reg and "two" not in reg and "three" in reg
    reg.drop("one")
    assert "one" not in reg and s1.cancel.is_set()


def test_session_refuses_a_second_job_until_the_first_ends():
    reg = SessionRegistry()
    s = reg.get("s")
    assert s.begin("quantize")
    assert not s.begin("evaluation")
    s.end()
    assert s.begin("evaluation")


def test_module_bytes_counts_parameters_and_buffers():
    m = torch.nn.Linear(4, 3)
    m.register_buffer("scale", torch.zeros(5))
    assert module_bytes(m) == (12 + 3 + 5) * 4


def test_background_job_streams_progress_and_result():
    def work(cb):
        for i in range(3):
            cb("search", (i + 1) / 3, f"block {i + 1} of 3")
            time.sleep(0.02)
        return "ok"

    job = BackgroundJob(work).start()
    tracker = StageTracker("test")
    for events in job.poll(interval=0.01):
        tracker.update(events)
    assert job.outcome() == "ok"
    md = tracker.markdown("done")
    assert "block 3 of 3" in md and "100%" in md


def test_background_job_reraises_the_workers_exception():
    job = BackgroundJob(lambda cb: 1 / 0).start()
    list(job.poll(interval=0.01))
    try:
        job.outcome()
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("expected the worker's exception")


def test_stage_tracker_marks_handed_over_stages_done():
    t = StageTracker("Quantizing")
    t.update([ProgressEvent("calibration", 0.5, "4/8", 0.0), ProgressEvent("veo", 0.3, "epoch 3/10", 0.0)])
    md = t.markdown()
    assert "✓ **calibration" in md and "▶ **VEO" in md and "epoch 3/10" in md


def test_heavy_work_lock_describes_its_holder():
    lock = HeavyWorkLock()
    assert lock.acquire("a quantization (W4A4 qvlm)", timeout=0.1)
    got = []
    other = threading.Thread(target=lambda: got.append(lock.acquire("other", timeout=0.05)))
    other.start()
    other.join()
    assert got == [False] and "W4A4 qvlm" in lock.describe()
    lock.release()
