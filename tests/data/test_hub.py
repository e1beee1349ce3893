"""The paper's hub benchmarks as tasks: named by get_task, nothing fetched at import, a clear error without ``datasets``."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from qvlm.data import HUB_TASKS, TASKS, get_task


def test_hub_tasks_are_found_by_name_but_not_listed_with_the_bundled_ones():
    assert get_task("scienceqa-img").title == "ScienceQA-IMG" and get_task("vqav2").title == "VQAv2"
    assert not set(HUB_TASKS) & set(TASKS)
    with pytest.raises(ValueError, match="vqav2"):
        get_task("nope")


def test_importing_the_tasks_does_not_import_datasets():
    code = "import sys, qvlm.data, qvlm.evaluation.bench; print('datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_hub_task_without_the_datasets_package_is_a_value_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if it were not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        get_task("scienceqa-img").evaluation_subset(4)


def test_hub_scoring_follows_each_benchmark():
    sqa = SimpleNamespace(answer="B")
    assert get_task("scienceqa-img").score("B. the moon", sqa) == 1.0
    assert get_task("scienceqa-img").score("A", sqa) == 0.0
    vqa = SimpleNamespace(references=("two", "two", "2", "Two", "three"))
    assert get_task("vqav2").score("two", vqa) == 1.0 and get_task("vqav2").score("three", vqa) == pytest.approx(1 / 3)
