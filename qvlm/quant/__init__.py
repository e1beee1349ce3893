"""Q-VLM post-training quantization: quantizers, recipes and the ``quantize`` pipeline.

    from qvlm.quant import QuantConfig, quantize, RECIPES
    result = quantize(handle, QuantConfig.from_bits("W4A4", recipe="qvlm"), progress=cb, cancel=event)
"""

from qvlm.progress import Cancelled
from qvlm.quant.config import BIT_SETTINGS, QuantConfig
from qvlm.quant.recipes import MENU_ORDER, RECIPE_INFO, RECIPES, Recipe, get_recipe
from qvlm.quant.pipeline import QuantResult, quantize
from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import ActQuantizer

__all__ = [
    "BIT_SETTINGS",
    "MENU_ORDER",
    "RECIPES",
    "RECIPE_INFO",
    "ActQuantizer",
    "Cancelled",
    "QuantConfig",
    "QuantLinear",
    "QuantResult",
    "Recipe",
    "get_recipe",
    "quantize",
]
