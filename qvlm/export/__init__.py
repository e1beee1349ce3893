"""Writing a quantized model to disk and reading it back: the project's packed layout and compressed-tensors.

:mod:`qvlm.export.checkpoints` holds both writers and the loaders; this package re-exports what callers use.
"""

from qvlm.export.checkpoints import (
    ACTIVATION_SIDECAR,
    COMPRESSED_TENSORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SAVE_FORMATS,
    WEIGHTS,
    ExportError,
    export_refusal,
    load_model,
    load_quantized,
    save_quantized,
)

__all__ = [
    "ACTIVATION_SIDECAR",
    "COMPRESSED_TENSORS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "SAVE_FORMATS",
    "WEIGHTS",
    "ExportError",
    "export_refusal",
    "load_model",
    "load_quantized",
    "save_quantized",
]
