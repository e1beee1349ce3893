"""Presets: named sets of :class:`~qvlm.quant.config.QuantConfig` values, each with where its values come from.

Why: the paper's text, the authors' released code and what measures best on the bundled models
disagree on where the vision tower's activation ranges come from, whether the vision tower is
quantized at all and which weight format is used (arXiv 2410.08119 §4.3 against the released code).
The default is the measured best (``recommended``, which ``QuantConfig()`` equals); the others
stay one choice away, ``deployable`` among them (the formats :mod:`qvlm.quant.integer` runs on int8
kernels). A preset names only the fields it sets; every other field keeps its ``QuantConfig``
default, and recipe and bits stay the run's own.

This module imports nothing from :mod:`qvlm.quant`, so the config can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    """One named starting point of a run: the values it gives some QuantConfig fields, and their source."""

    name: str
    """What the CLI (``--preset``), the app and ``config.json`` (``"preset"``) call it."""
    label: str
    """Its name in the app's menu."""
    description: str
    """One sentence for the user: what it is for."""
    values: Mapping[str, Any]
    """QuantConfig field -> value (read-only); fields not named keep their QuantConfig default."""
    source: str
    """Where the values come from: a paper section, a file of the repository, a measurement."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


INTEGER_FORMATS: Mapping[str, Any] = MappingProxyType({
    "weight_format": "uniform", "weight_group_size": None,
    "act_granularity_language": "dynamic_token", "act_granularity_vision": "dynamic_token"})
"""The formats :mod:`qvlm.quant.integer` runs on int8 kernels in both towers: one weight step per output channel,
each token row's own input range at run time. ``deployable`` and ``integer`` differ only in the vision rotation."""

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="recommended",
        label="Recommended",
        description="What measures best on the bundled models: the paper's method with the vision tower's inputs "
                    "rotated (Hadamard) and per-channel static activation ranges there.",
        values={"act_granularity_vision": "channel", "vision_rotation": "hadamard"},
        source="Measured on held-out train questions, then confirmed once on the test splits: "
               "benchmarks/results/vision_ranges/README.md (mosaic model, W4A4 qlora, held-out: per-token ranges "
               "61.8%, per-channel 79.9%, per-channel + Hadamard 83.0%, FP 84.2%).",
    ),
    Preset(
        name="paper",
        label="Paper",
        description="The paper's text: static per-token activation ranges in the vision tower, per-channel in "
                    "the LLM, vision tower quantized, projector kept in floating point.",
        values={"act_granularity_vision": "token", "vision_rotation": "none", "act_granularity_language": "channel",
                "quantize_vision": True, "quantize_projector": False},
        source="arXiv 2410.08119 §4.3 (per-token vision and per-channel language activation ranges) and Table 4 "
               "(the CLIP encoder is quantized); the projector is not mentioned, nor is any rotation. "
               "Weights: the recipe's own "
               "format (qvlm/quant/recipes.py). CDM's block objective, search order and acceptance check keep "
               "their measured defaults here too (README 'How the CDM defaults were chosen'); Eq. 3 read literally "
               "is block_objective='linear_output', joint_search='exhaustive', cdm_accept='block'.",
    ),
    Preset(
        name="authors-code",
        label="Authors' code",
        description="What the authors' released code runs: vision tower in floating point, NF4 weights, "
                    "per-channel LLM activations, clipping search by the l0.5 distance.",
        values={"quantize_vision": False, "weight_format": "nf4", "act_granularity_language": "channel",
                "init_lp_norm": 0.5, "quantize_projector": False},
        source="The authors' released Q-VLM code: llava/model/builder.py (NF4 weights in blocks of 64, "
               "mm_projector reloaded in FP16), llava/model/multimodal_encoder/clip_encoder.py (the 4-bit CLIP load "
               "commented out: the vision tower runs in 16 bits), custom_bitsandbytes/bitsandbytes/quantization_utils/"
               "quant_modules.py (QuantAct: static per-input-channel LLaMA activation ranges, each range's shrink "
               "factor chosen by the smallest mean |Q(x)-x|^0.5).",
    ),
    Preset(
        name="deployable",
        label="Deployable (integer kernels)",
        description="The formats the integer execution path runs, so the variant answers on int8 kernels: uniform "
                    "weights with one range per output channel, activations quantized per token on each row's own "
                    "range at run time in both towers.",
        values={**INTEGER_FORMATS, "vision_rotation": "none"},
        source="qvlm/quant/integer.py (IntegerLinear: a weight step per output channel and an input step per "
               "token row factor out of the sum over input channels; grouped or NormalFloat weights and per-input-"
               "channel activation ranges do not). Dynamic ranges need no calibration, so the steps that train "
               "static ranges (VEO) leave them; the awq recipe keeps its groups of 64, so it stays simulated.",
    ),
    Preset(
        name="integer",
        label="Integer-friendly, rotated vision",
        description="Deployable's formats (uniform weights, one range per output channel, each token row's own "
                    "range at run time in both towers) with the vision tower's inputs rotated (Hadamard, applied "
                    "online by the integer layers): the most accurate variant the integer path can run.",
        values={**INTEGER_FORMATS, "vision_rotation": "hadamard"},
        source="Measured on the mosaic model, calibration 64, one thread (benchmarks/results/integer_recipe/): "
               "held-out W4A4 83.9% vs the recommended qvlm's 82.0% (McNemar p = 0.029), W4A3 76.2% vs 77.8% "
               "(p = 0.23); test split W4A4 83.17% vs 82.55 / 81.94 / 83.08% (calibration seeds 0-2), W4A3 "
               "77.48% vs 75.90% (seed 0, p = 0.011). Dynamic ranges leave VEO and CDM nothing to train: qvlm "
               "answers as qlora here.",
    ),
)}
"""The presets, in menu order; ``recommended`` first (the default)."""

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
DEFAULT_PRESET = "recommended"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the choices for any other name."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}") from None
