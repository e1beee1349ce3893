"""The UI's one door into the quantization core (``qvlm.quant``, ``qvlm.analysis``).

Everything the panels need from the core goes through here: the recipe list, the default
config values shown in the "advanced" accordion, building a validated ``QuantConfig`` from
form fields, and a stable key/label per config. Imports are lazy so that the app starts (and
its core-independent tests run) even when the core fails to import, and so that startup
does not pay for modules the first page view does not need. No gradio import.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

BITS = ("W8A8", "W6A6", "W4A4", "W3A3")
FALLBACK_RECIPES = ("fp", "rtn", "qlora", "awq", "qvlm-cdm", "qvlm-veo", "qvlm")
RECIPE_LABELS = {
    "qvlm": "Q-VLM (CDM + VEO)",
    "qvlm-cdm": "Q-VLM, CDM only (ablation)",
    "qvlm-veo": "Q-VLM, VEO only (ablation)",
    "qlora": "QLoRA-style lp clipping (baseline)",
    "awq": "AWQ (baseline)",
    "rtn": "round-to-nearest, min/max (baseline)",
    "fp": "no quantization (reference)",
}
FALLBACK_DEFAULTS: dict[str, Any] = {
    "calib_size": 16,
    "max_block_depth": 3,
    "h0_rule": "mean",
    "percentiles": (1.0, 0.995, 0.99, 0.985, 0.98),
    "veo_epochs": 10,
    "veo_eta": 1.0,
    "veo_lambda1": 0.01,
    "veo_lambda2": 1.0,
}
H0_RULES = ("mean", "median", "quantile:0.75")


def recipes() -> list[str]:
    """Recipe names, Q-VLM first; the core's list when it imports, the contract's otherwise."""
    try:
        from qvlm.quant import RECIPES

        names = list(RECIPES)
    except Exception:  # noqa: BLE001 - the UI must still start
        names = list(FALLBACK_RECIPES)
    order = {name: i for i, name in enumerate(("qvlm", "qvlm-cdm", "qvlm-veo", "qlora", "awq", "rtn", "fp"))}
    return sorted((n for n in names if n != "fp"), key=lambda n: order.get(n, 99))


def recipe_choices() -> list[tuple[str, str]]:
    return [(RECIPE_LABELS.get(r, r), r) for r in recipes()]


def default_values() -> dict[str, Any]:
    """The config defaults the core documents (Q-VLM W4A4), for the advanced accordion."""
    values = dict(FALLBACK_DEFAULTS)
    try:
        from qvlm.quant import QuantConfig

        cfg = QuantConfig.from_bits("W4A4", recipe="qvlm")
        for key in values:
            if hasattr(cfg, key):
                values[key] = getattr(cfg, key)
    except Exception:  # noqa: BLE001
        pass
    values["calib_size"] = min(int(values["calib_size"]), 16)  # fast first result on a CPU
    return values


def parse_percentiles(text: str | None) -> tuple[float, ...]:
    """"1.0, 0.995, 0.99" -> (1.0, 0.995, 0.99); ValueError with a message for the form."""
    tokens = [t for t in re.split(r"[,\s;]+", (text or "").strip()) if t]
    if not tokens:
        raise ValueError("The percentile grid is empty: give at least one value such as 1.0, 0.99.")
    values = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"Percentile grid: '{t}' is not a number.") from None
        if not 0.5 < v <= 1.0:
            raise ValueError(f"Percentile grid: {v} is outside (0.5, 1.0] (1.0 keeps the full min/max range).")
        if v in values:
            raise ValueError(f"Percentile grid: {v} appears twice.")
        values.append(v)
    if len(values) > 20:
        raise ValueError(f"The percentile grid has {len(values)} values; at most 20 keep the search fast.")
    return tuple(values)


def normalize_h0_rule(text: str | None) -> str:
    """The h0 field as the core spells it: a bare number means a fixed threshold ("value:<x>")."""
    h0 = (text or "").strip().lower()
    if not h0:
        raise ValueError("The h0 rule is empty: use 'mean', 'median', 'quantile:<q>' or a number.")
    try:
        return f"value:{float(h0):g}"
    except ValueError:
        pass
    if h0 in ("mean", "median") or h0.startswith(("quantile:", "value:")):
        return h0
    raise ValueError(f"h0 rule '{text}' not understood: use 'mean', 'median', 'quantile:<q>' (0..1) or a number.")


def _as_int(name: str, value: Any, lo: int, hi: int) -> int:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number.") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi} (got {v}).")
    return v


def _as_float(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number.") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi} (got {v}).")
    return v


def build_config(
    bits: str,
    recipe: str,
    calib_size: Any,
    max_block_depth: Any,
    h0_rule: str,
    percentiles: str,
    veo_epochs: Any,
    veo_eta: Any,
    veo_lambda1: Any,
    veo_lambda2: Any,
) -> Any:
    """A validated ``QuantConfig``; ValueError with a user-facing message for any bad field.

    Ranges are checked here too (not only by ``cfg.validate()``) so that a CPU app refuses a
    256-sample calibration or 1000 VEO epochs with a reason before anything starts.
    """
    if bits not in BITS:
        raise ValueError(f"Unknown bit-width {bits!r}; choose one of {', '.join(BITS)}.")
    if recipe not in recipes() and recipe != "fp":
        raise ValueError(f"Unknown recipe {recipe!r}; choose one of {', '.join(recipes())}.")
    h0_value = normalize_h0_rule(h0_rule)
    kwargs = dict(
        calib_size=_as_int("Calibration size", calib_size, 1, 256),
        max_block_depth=_as_int("Max block depth", max_block_depth, 1, 8),
        h0_rule=h0_value,
        percentiles=parse_percentiles(percentiles),
        veo_epochs=_as_int("VEO epochs", veo_epochs, 0, 100),
        veo_eta=_as_float("η (eta)", veo_eta, 0.0, 100.0),
        veo_lambda1=_as_float("λ1", veo_lambda1, 0.0, 100.0),
        veo_lambda2=_as_float("λ2", veo_lambda2, 0.0, 100.0),
    )
    from qvlm.quant import QuantConfig

    cfg = QuantConfig.from_bits(bits, recipe=recipe, **kwargs)
    cfg.validate()
    return cfg


def config_key(model: str, cfg: Any) -> str:
    """Two runs with this key would give the same variant: the model and every config field."""
    if dataclasses.is_dataclass(cfg):
        fields = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        fields = cfg.to_dict()
    else:
        fields = {"repr": repr(cfg)}
    return json.dumps({"model": model, **fields}, sort_keys=True, default=str)


def variant_label(bits: str, recipe: str) -> str:
    return f"{bits} {recipe}"


def cancelled_types() -> tuple[type[BaseException], ...]:
    """Every exception class that means "the user cancelled" (the core's and the shared one)."""
    from qvlm.progress import Cancelled

    types: list[type[BaseException]] = [Cancelled]
    try:
        from qvlm.quant import Cancelled as QuantCancelled

        types.append(QuantCancelled)
    except Exception:  # noqa: BLE001
        pass
    return tuple(types)


def weight_memory(model: Any) -> dict[str, Any] | None:
    try:
        from qvlm.quant.memory import weight_memory as wm
    except Exception:  # noqa: BLE001
        return None
    return wm(model)


def ded_sweep(fp_handle: Any, result: Any, n_samples: int, progress: Any = None, cancel: Any = None) -> dict[int, Any]:
    """DED analyses of every adjacent decoder-layer pair, {k: analysis of (k, k+1)}.

    One sweep rebuilds the layer-wise initialization once and then walks all layers, so the
    layer slider is instant afterwards; per-layer calls would each pay for the rebuild.
    """
    from qvlm.analysis import ded_sweep as run

    return {a.layer: a for a in run(fp_handle, result, n_samples=n_samples, progress=progress, cancel=cancel)}
