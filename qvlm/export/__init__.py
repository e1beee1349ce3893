"""Writing a quantized model to disk and reading it back: the project's packed layout, compressed-tensors and
bitsandbytes.

:mod:`qvlm.export.checkpoints` holds the packed and compressed-tensors writers and the loaders,
:mod:`qvlm.export.bitsandbytes` the bitsandbytes NF4 writer, :mod:`qvlm.export.layout` what every folder
shares; this package re-exports what callers use.
"""

from qvlm.export.bitsandbytes import BITSANDBYTES, W4A16_NOTE
from qvlm.export.checkpoints import (
    COMPRESSED_TENSORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SAVE_FORMATS,
    ExportError,
    export_refusal,
    load_model,
    load_quantized,
    save_quantized,
)
from qvlm.export.layout import ACTIVATION_SIDECAR, README, WEIGHTS, shown_path, without_paths

__all__ = [
    "ACTIVATION_SIDECAR",
    "BITSANDBYTES",
    "COMPRESSED_TENSORS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "README",
    "SAVE_FORMATS",
    "W4A16_NOTE",
    "WEIGHTS",
    "ExportError",
    "export_refusal",
    "load_model",
    "load_quantized",
    "save_quantized",
    "shown_path",
    "without_paths",
]
