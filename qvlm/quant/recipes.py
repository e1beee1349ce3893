"""The named recipes: each one an ordered tuple of stages, in one table.

A recipe is a tuple of configured stages (:class:`LayerwiseInit`, :class:`VisualEncoderOptimization`,
:class:`CrossLayerDependencyMining`, like llm-compressor's modifiers), so the app, the CLI and the bench
all mean the same thing by "qlora" or "qvlm". Each stage owns its settings; the named recipes hold
them at their defaults, and :func:`configured_stages` applies a config's saved values (a preset is a
partial override of those values). Any other tuple runs too: ``quantize(handle, config, stages=(...))``,
e.g. VEO with its own learning rate, then CDM with blocks of at most two layers::

    stages = (QLORA_INIT, VisualEncoderOptimization(lr=0.05), CrossLayerDependencyMining(max_block_depth=2))

Paper mapping (arXiv 2410.08119, Table 1/2 and §4.3):

* ``rtn``      round-to-nearest uniform weights (per output channel), min/max static activation
               ranges; the floor.
* ``qlora``    the paper's "QLoRA" baseline: NormalFloat weights (NF4 at 4 bits, blocks of 64),
               per-channel (LLM) / per-token (vision) activations, min/max then layer-wise lp
               clipping. No LoRA fine-tuning is involved (the paper's baseline has none either).
* ``awq``      the paper's "AWQ" baseline: AWQ's activation-aware per-channel weight scaling
               search on grouped uniform weights (AWQ's INT-g128 setting, with groups of 64 because
               128 does not divide the bundled model's 192-wide layers), plus the same activation
               quantizers as ``qlora``.
* ``qvlm-cdm`` the ``qlora`` baseline + cross-layer dependency mining (Eqs. 3-7).
* ``qvlm-veo`` the ``qlora`` baseline + visual encoder optimization (Eqs. 8-10).
* ``qvlm``     the ``qlora`` baseline -> VEO -> CDM (the full method).

Why the Q-VLM recipes keep the baseline's NormalFloat weights (``weight_format="auto"``): the paper
builds Q-VLM on the QLoRA initialisation ("we followed the initialization ... in QLoRA for the
baseline methods and our Q-VLM"), its ablation (Table 1) reports the *same* memory for the QLoRA
row and the +CDM / +VEO / Q-VLM rows, and the authors' code quantizes Q-VLM's weights to NF4.
CDM and VEO only touch activation ranges, so sharing the weights makes the ablation measure them
and nothing else. The paper's sentence on "uniform quantization" is honoured for activations; set
``weight_format="uniform"`` for uniform weights everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from qvlm.quant.cdm import CrossLayerDependencyMining
from qvlm.quant.layerwise import LayerwiseInit
from qvlm.quant.veo import VisualEncoderOptimization

if TYPE_CHECKING:
    from qvlm.quant.config import QuantConfig
    from qvlm.quant.run import QuantRun


class Stage(Protocol):
    """One step of a recipe: its settings are its fields; it works on the shared run in place.

    A stage with settings to save names them in ``SAVED_AS`` (field -> saved config field); one without
    (a test's recorder) has none to save.
    """

    name: ClassVar[str]

    def run(self, qrun: "QuantRun") -> None: ...


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    description: str
    stages: tuple[Stage, ...] = ()
    """Run in order on one :class:`~qvlm.quant.run.QuantRun`; empty for the FP reference."""

    @property
    def init(self) -> LayerwiseInit | None:
        """The recipe's layer-wise init (the state CDM starts from; the DED analysis rebuilds it)."""
        return next((s for s in self.stages if isinstance(s, LayerwiseInit)), None)


QLORA_INIT = LayerwiseInit(weights="nf4", act_init="lp")
"""NormalFloat weights, min/max then lp clipping: the QLoRA baseline and every Q-VLM recipe's start."""

_RECIPE_LIST = (
    Recipe("fp", "no quantization (reference)", "No quantization (reference)."),
    Recipe("rtn", "round-to-nearest, min/max (baseline)", "Round-to-nearest weights; min/max static activation "
           "ranges.", (LayerwiseInit(weights="uniform", act_init="minmax"),)),
    Recipe("qlora", "QLoRA-style lp clipping (baseline)",
           "NormalFloat weights; per-channel/per-token activations; min/max then layer-wise lp clipping.",
           (QLORA_INIT,)),
    Recipe("awq", "AWQ (baseline)", "AWQ activation-aware weight scaling (grouped uniform weights); same "
           "activation quantizers.", (LayerwiseInit(weights="uniform", weight_group=64, scaling="awq"),)),
    Recipe("qvlm-cdm", "Q-VLM, CDM only (ablation)", "QLoRA baseline + entropy-guided block partition + joint "
           "search.", (QLORA_INIT, CrossLayerDependencyMining())),
    Recipe("qvlm-veo", "Q-VLM, VEO only (ablation)", "QLoRA baseline + visual-encoder optimization.",
           (QLORA_INIT, VisualEncoderOptimization())),
    Recipe("qvlm", "Q-VLM (CDM + VEO)", "QLoRA baseline -> VEO -> CDM: the full method.",
           (QLORA_INIT, VisualEncoderOptimization(), CrossLayerDependencyMining())),
)

RECIPE_INFO: dict[str, Recipe] = {r.name: r for r in _RECIPE_LIST}
RECIPES: tuple[str, ...] = tuple(RECIPE_INFO)
"""Recipe names in table order (the reference, the baselines, the ablations, the full method);
the same tuple as :data:`qvlm.quant.config.RECIPE_NAMES`, the names a config validates against."""

MENU_ORDER: tuple[str, ...] = ("qvlm", "qvlm-cdm", "qvlm-veo", "qlora", "awq", "rtn")
"""The quantizing recipes in the order the app offers them: the method, its ablations, the baselines."""


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPE_INFO[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def resolve_weights(config: "QuantConfig") -> tuple[str, int | None]:
    """(weight format, group size) the layer-wise init of ``config.recipe`` uses under ``config``."""
    init = get_recipe(config.recipe).init
    if init is None:  # "fp": nothing is quantized; report what a uniform override would use
        return ("uniform" if config.weight_format == "auto" else config.weight_format), config.weight_group_size
    return init.resolve_weights(config)


def configure(stage: Stage, config: "QuantConfig") -> Stage:
    """``stage`` with its saved settings read from ``config`` (a stage with none is returned as it is)."""
    saved = getattr(type(stage), "SAVED_AS", {})
    return replace(stage, **{f: _stage_value(getattr(config, name)) for f, name in saved.items()}) if saved else stage


def configured_stages(config: "QuantConfig") -> tuple[Stage, ...]:
    """The stages of ``config.recipe``, each configured by ``config``'s saved settings."""
    return tuple(configure(stage, config) for stage in get_recipe(config.recipe).stages)


def _stage_value(value: Any) -> Any:
    """A saved value as a stage field holds it (JSON lists become tuples, so stages stay hashable and comparable)."""
    return tuple(value) if isinstance(value, list) else value
