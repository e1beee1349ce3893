"""Shared fixtures: the bundled model is loaded once per test session (it takes ~1 s)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# kernel choices are timed once per test session, never read from (or written to) the user's cache
os.environ["QVLM_KERNEL_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="qvlm-kernels-"), "kernels.json")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from qvlm.models import BUNDLED_MODEL_DIR

    return Path(os.environ.get("QVLM_TEST_MODEL", BUNDLED_MODEL_DIR))


@pytest.fixture(scope="session")
def bundled(bundled_dir):
    """A read-only handle on the bundled model; tests must not modify it (quantize makes copies)."""
    from qvlm.models import load_vlm

    return load_vlm(bundled_dir)


@pytest.fixture(scope="session")
def tiny_mosaic_dir(tmp_path_factory) -> Path:
    """A genuine LlavaForConditionalGeneration trained for 2 steps on the mosaic task (~20 s, once per session).

    Its answers are noise, but its folder says task "mosaic" like the bundled mosaic model's, so the app's
    task-following paths run on a real model without waiting for (or needing) the real one.
    """
    from training.__main__ import main

    out = tmp_path_factory.mktemp("mosaic") / "tiny-llava-mosaic"
    args = ["mosaic", "--out", str(out), "--tiny", "--max-steps", "2", "--eval-questions", "8", "--threads", "2"]
    assert main(args) == 0
    return out


MODEL_FIXTURES = {"bundled", "bundled_dir", "tiny_mosaic_dir"}
"""Fixtures that load (or build) a bundled model: a test that uses one, directly or through another, is "model"."""


def pytest_collection_modifyitems(config, items):
    """Mark each test by what it needs (pyproject.toml's markers), so that -m selects without a list to keep."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
        if e2e in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
