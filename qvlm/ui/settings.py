"""App settings read once from the environment, so a Space or a lab server is configured without code.

Environment variables (all optional):

- ``QVLM_DEFAULT_MODEL``: the model preselected in the Quantize panel (default: the bundled model;
  during development a folder such as ``/tmp/smoke``).
- ``QVLM_ALLOWED_MODEL_DIRS``: ``os.pathsep``-separated folders local models may be loaded from
  (default: the repository's ``assets/`` folder). Anything else typed into the model box is refused.
- ``QVLM_HUB_MODELS``: comma-separated hub ids offered in the model list.
- ``QVLM_MAX_VARIANTS`` / ``QVLM_VARIANT_BUDGET_MB``: how many quantized variants one browser
  session may hold, and their total memory; the least recently used one is dropped beyond that.
- ``QVLM_MAX_SESSIONS``: how many browser sessions keep variants at once (idle ones are dropped first).
- ``QVLM_CONCURRENCY``: Gradio's default concurrency limit (default 2: this is a 2-core CPU app).
- ``QVLM_MEMORY_BUDGET_MB``: the memory a model may use (default: what the machine has available).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qvlm.data import DEFAULT_TASK, task_of_model_folder
from qvlm.models import BUNDLED_MODEL_DIR, BUNDLED_MODEL_NAME, BUNDLED_MODELS, SHORT_NAMES, ModelLoadError, bundled_name
from qvlm.models.loader import resolve_source

REPO_ROOT = BUNDLED_MODEL_DIR.parents[1]
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"

# Stock transformers LLaVA checkpoints a user may try; on a CPU Space only the small ones load,
# the 7B ones are refused by the memory estimate with a message (which is itself instructive).
DEFAULT_HUB_MODELS = (
    "llava-hf/llava-interleave-qwen-0.5b-hf",
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf",
)


def bundled_display_name(name: str) -> str | None:
    """The display name of a bundled model given by any spelling (display name, short name, its folder); else None.

    Why one function: the model list, the session keys (:func:`qvlm.ui.state.canonical_name`) and the
    default model must agree that ``mosaic``, ``assets/tiny-llava-mosaic`` and its display name are one model.
    """
    text = SHORT_NAMES.get(name.strip(), name.strip())
    if text in BUNDLED_MODELS:
        return text
    path = Path(text).expanduser()
    return bundled_name(path) if text and path.is_dir() else None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Settings:
    """Everything configurable about one running app."""

    default_model: str = BUNDLED_MODEL_NAME
    allowed_roots: list[Path] = field(default_factory=lambda: [REPO_ROOT / "assets"])
    hub_models: tuple[str, ...] = DEFAULT_HUB_MODELS
    max_variants: int = 4
    variant_budget_bytes: int = 2 * 2**30
    max_sessions: int = 8
    concurrency: int = 2
    memory_budget_bytes: int | None = None
    preload: bool = True

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        s = cls()
        if os.environ.get("QVLM_DEFAULT_MODEL"):
            s.default_model = os.environ["QVLM_DEFAULT_MODEL"]
        if os.environ.get("QVLM_ALLOWED_MODEL_DIRS"):
            s.allowed_roots = [Path(p) for p in os.environ["QVLM_ALLOWED_MODEL_DIRS"].split(os.pathsep) if p]
        if os.environ.get("QVLM_HUB_MODELS") is not None:
            s.hub_models = tuple(m.strip() for m in os.environ["QVLM_HUB_MODELS"].split(",") if m.strip())
        s.max_variants = max(1, _env_int("QVLM_MAX_VARIANTS", s.max_variants))
        s.variant_budget_bytes = max(1, _env_int("QVLM_VARIANT_BUDGET_MB", s.variant_budget_bytes // 2**20)) * 2**20
        s.max_sessions = max(1, _env_int("QVLM_MAX_SESSIONS", s.max_sessions))
        s.concurrency = max(1, _env_int("QVLM_CONCURRENCY", s.concurrency))
        if os.environ.get("QVLM_MEMORY_BUDGET_MB"):
            s.memory_budget_bytes = _env_int("QVLM_MEMORY_BUDGET_MB", 0) * 2**20 or None
        for key, value in overrides.items():
            if value is not None:
                setattr(s, key, value)
        s.default_model = bundled_display_name(s.default_model) or s.default_model  # as the model list names it
        s._allow_default_model_folder()
        return s

    def _allow_default_model_folder(self) -> None:
        """A default model given as a folder (by whoever started the app) is allowed by definition."""
        if bundled_display_name(self.default_model):
            return
        path = Path(self.default_model).expanduser()
        if path.is_dir() and not any(path.resolve().is_relative_to(r.resolve()) for r in self.allowed_roots):
            self.allowed_roots.append(path.resolve())

    def model_choices(self) -> list[str]:
        """The model dropdown: the default, every bundled model present (easy-VQA first), the other local
        folders found in the allowed roots, hub ids. A bundled model appears once, by its display name."""
        default = bundled_display_name(self.default_model) or self.default_model
        bundled = [name for name, folder in BUNDLED_MODELS.items() if (folder / "config.json").is_file()]
        choices = ([] if default in bundled else [default]) + bundled
        for root in self.allowed_roots:
            for config in sorted(root.glob("*/config.json")) if root.is_dir() else []:
                folder = str(config.parent.resolve())
                if not bundled_name(config.parent) and folder not in choices:
                    choices.append(folder)
        choices.extend(m for m in self.hub_models if m not in choices)
        return choices

    def model_task(self, name: str) -> str:
        """The task of the model called ``name`` (:data:`qvlm.data.TASKS`), read from its folder without loading it.

        Why not load it: the Ask tab switches its examples as soon as the model box changes, and a hub model
        may take minutes to load. Hub ids, and names this app may not load (their load reports why), are easy-VQA.
        """
        try:
            location, source = resolve_source(name, self.allowed_roots)
        except ModelLoadError:
            return DEFAULT_TASK
        return DEFAULT_TASK if source == "hub" else task_of_model_folder(location)
