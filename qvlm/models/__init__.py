"""Loading LLaVA-family models, choosing their device and mapping their layers."""

from qvlm.models.device import default_dtype, gpu_task, on_space, on_zero_gpu, resolve_device
from qvlm.models.layer_map import LayerEntry, LayerMap, build_layer_map, core_model
from qvlm.models.loader import (
    BUNDLED_MODEL_DIR,
    BUNDLED_MODEL_NAME,
    PACKED_EXPORT_MANIFEST,
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    VLMHandle,
    copies_fit,
    estimate_weight_bytes,
    is_packed_export,
    load_vlm,
    model_classes,
)

__all__ = [
    "BUNDLED_MODEL_DIR",
    "BUNDLED_MODEL_NAME",
    "PACKED_EXPORT_MANIFEST",
    "SUPPORTED_MODEL_TYPES",
    "LayerEntry",
    "LayerMap",
    "ModelLoadError",
    "VLMHandle",
    "build_layer_map",
    "copies_fit",
    "core_model",
    "default_dtype",
    "estimate_weight_bytes",
    "gpu_task",
    "is_packed_export",
    "load_vlm",
    "model_classes",
    "on_space",
    "on_zero_gpu",
    "resolve_device",
]
