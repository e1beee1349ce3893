"""Shared fixtures: the bundled model is loaded once per test session (it takes ~1 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
