"""Q-VLM post-training quantization: quantizers, the run's stages, recipes and ``quantize``.

    from qvlm.quant import QuantConfig, quantize
    result = quantize(handle, QuantConfig.from_bits("W4A4", recipe="qvlm"), progress=cb, cancel=event)

A run (:class:`QuantRun`: the working copy, its layer map, the cached calibration inputs) goes
through the stages of its recipe (:mod:`qvlm.quant.recipes`), each a small object whose settings
are its fields: :class:`LayerwiseInit` -> :class:`VisualEncoderOptimization` ->
:class:`CrossLayerDependencyMining`.

Where each equation of the paper (arXiv 2410.08119) lives:

==========  ============================================================  =============================================
Eq.         what                                                          function
==========  ============================================================  =============================================
1           the whole-model objective (final-output error; NP-hard to     :meth:`QuantRun.measure` (``output_mse``);
            search, so it is only measured) with inputs propagated on     :meth:`QuantRun.language_input`,
            the quantized path                                            :func:`qvlm.quant.calibration.run_layer`
2           layer-wise (greedy) search of each layer's range              :func:`qvlm.quant.quantizers.lp_clip_search`
                                                                          (init), :func:`qvlm.quant.search.exhaustive_search`
                                                                          (``greedy_choice``)
3           joint search over a block's layers                            :func:`qvlm.quant.search.exhaustive_search`,
                                                                          :func:`~qvlm.quant.search.coordinate_search`,
                                                                          driven by :func:`qvlm.quant.cdm.search_blocks`
4           conditional entropy D(k, k+1) of adjacent layers' levels      :func:`qvlm.quant.entropy.pair_entropy`,
                                                                          :func:`~qvlm.quant.entropy.conditional_entropy`
5           soft assignment of activations to quantization levels         :func:`qvlm.quant.entropy.soft_assign`,
                                                                          :func:`~qvlm.quant.entropy.soft_assign_banded`
6           entropy of a block = sum of its adjacent pairs                :func:`qvlm.evaluation.analysis.ded_sweep`
7           block partition by the threshold h0 and a maximum depth       :func:`qvlm.quant.partition.partition_layers`,
                                                                          :meth:`CrossLayerDependencyMining.h0_value`
8           Jacobian-weighted entropy L_ent of the vision tower           :func:`qvlm.quant.veo.weighted_entropy`,
            (weights w_k)                                                 :func:`~qvlm.quant.veo.jacobian_weights`
9           visual + LLM output error L_err                               :func:`qvlm.quant.veo.output_error`
10          VEO objective L_reg + lambda1 L_ent + lambda2 L_err           :func:`qvlm.quant.veo.veo_objective`, trained by
                                                                          :func:`~qvlm.quant.veo.optimize_vision_bounds`
==========  ============================================================  =============================================
"""

from qvlm.utils.progress import Cancelled
from qvlm.quant.cdm import CrossLayerDependencyMining
from qvlm.quant.config import BIT_SETTINGS, QuantConfig
from qvlm.quant.layerwise import LayerwiseInit
from qvlm.quant.pipeline import QuantResult, quantize
from qvlm.quant.presets import PRESET_NAMES, PRESETS, Preset, get_preset
from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import ActQuantizer
from qvlm.quant.recipes import MENU_ORDER, RECIPE_INFO, RECIPES, Recipe, Stage, get_recipe, resolve_weights
from qvlm.quant.run import QuantRun
from qvlm.quant.veo import VisualEncoderOptimization

__all__ = [
    "BIT_SETTINGS",
    "MENU_ORDER",
    "PRESETS",
    "PRESET_NAMES",
    "RECIPES",
    "RECIPE_INFO",
    "ActQuantizer",
    "Cancelled",
    "CrossLayerDependencyMining",
    "LayerwiseInit",
    "Preset",
    "QuantConfig",
    "QuantLinear",
    "QuantResult",
    "QuantRun",
    "Recipe",
    "Stage",
    "VisualEncoderOptimization",
    "get_preset",
    "get_recipe",
    "quantize",
    "resolve_weights",
]
