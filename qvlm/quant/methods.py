"""The named recipes: what each one switches on, in one table.

A recipe is a fixed combination of the pipeline's stages, so the app, the CLI and the bench
all mean the same thing by "qlora" or "qvlm". Numeric knobs stay in :class:`QuantConfig`.

Paper mapping (arXiv 2410.08119, Table 1/2 and §4.3; design note §7-§8):

* ``rtn``      round-to-nearest weights, min/max static activation ranges; the floor.
* ``qlora``    the paper's "QLoRA" baseline: NormalFloat weights (NF4 at 4 bits), per-channel
               (LLM) / per-token (vision) activations, min/max then layer-wise lp clipping.
               No LoRA fine-tuning is involved (the paper's baseline has none either).
* ``awq``      the paper's "AWQ" baseline: AWQ's activation-aware per-channel weight scaling
               search, uniform weights, plus the same activation quantizers as ``qlora``.
* ``qvlm-cdm`` layer-wise init + cross-layer dependency mining (Eqs. 3-7).
* ``qvlm-veo`` layer-wise init + visual encoder optimization (Eqs. 8-10).
* ``qvlm``     init -> VEO -> CDM (the full method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightFormat = Literal["uniform", "nf4"]
ActInit = Literal["minmax", "lp"]


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    description: str
    quantize: bool = True
    weight_format: WeightFormat = "uniform"  # used when QuantConfig.weight_format == "auto"
    act_init: ActInit = "lp"
    awq: bool = False
    veo: bool = False
    cdm: bool = False


_RECIPE_LIST = (
    Recipe("fp", "Full precision", "No quantization (reference).", quantize=False),
    Recipe("rtn", "RTN", "Round-to-nearest weights; min/max static activation ranges.", act_init="minmax"),
    Recipe(
        "qlora",
        "QLoRA (baseline)",
        "NormalFloat weights; per-channel/per-token activations; min/max then layer-wise lp clipping.",
        weight_format="nf4",
    ),
    Recipe("awq", "AWQ (baseline)", "AWQ activation-aware weight scaling; same activation quantizers.", awq=True),
    Recipe("qvlm-cdm", "Q-VLM: CDM only", "Layer-wise init + entropy-guided block partition + joint search.", cdm=True),
    Recipe("qvlm-veo", "Q-VLM: VEO only", "Layer-wise init + visual-encoder optimization.", veo=True),
    Recipe("qvlm", "Q-VLM (CDM + VEO)", "Layer-wise init -> VEO -> CDM: the full method.", veo=True, cdm=True),
)

RECIPE_INFO: dict[str, Recipe] = {r.name: r for r in _RECIPE_LIST}
RECIPES: tuple[str, ...] = tuple(RECIPE_INFO)
"""Recipe names in display order."""


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPE_INFO[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None
