"""Loading LLaVA-family models and mapping their layers."""

from qvlm.models.layer_map import LayerEntry, LayerMap, build_layer_map, core_model
from qvlm.models.loader import (
    BUNDLED_MODEL_DIR,
    BUNDLED_MODEL_NAME,
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    VLMHandle,
    estimate_weight_bytes,
    load_vlm,
)

__all__ = [
    "BUNDLED_MODEL_DIR",
    "BUNDLED_MODEL_NAME",
    "SUPPORTED_MODEL_TYPES",
    "LayerEntry",
    "LayerMap",
    "ModelLoadError",
    "VLMHandle",
    "build_layer_map",
    "core_model",
    "estimate_weight_bytes",
    "load_vlm",
]
