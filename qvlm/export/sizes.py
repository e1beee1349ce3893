"""The bytes a download really takes: on disk (as ``du -b`` counts them) and in memory after its documented load.

Why measured: "2,638,464 bytes packed" counted the packed Linears only, while the folder held float32 copies of
everything else and a plain ``from_pretrained`` decompressed it to twice the FP16 model. A sentence about size
must be the number a user sees, so these functions measure the folder and the loaded model, never shapes times bits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qvlm.models import model_classes


def folder_bytes(folder: str | Path) -> int:
    """Apparent bytes of ``folder`` and everything in it, directories included: what ``du -b -s`` prints."""
    folder = Path(folder)
    total = os.lstat(folder).st_size
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def _per_storage(model: nn.Module, size: Callable[[torch.Tensor], int]) -> int:
    """The sum of ``size`` over ``model``'s parameters and buffers, each storage counted once (tied weights share
    one), the largest size seen for it."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), size(t))
    return sum(seen.values())


def resident_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers as held in memory."""
    return _per_storage(model, lambda t: t.untyped_storage().nbytes())


def plain_load_bytes(folder: str | Path) -> int:
    """:func:`resident_bytes` after ``<Model>.from_pretrained(folder)`` with no other argument (what an export's
    README tells a user to type), on the CPU."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    return resident_bytes(model_classes()[config.model_type].from_pretrained(folder, local_files_only=True))


@dataclass(frozen=True)
class SizeReport:
    """A saved variant's bytes next to its FP model's: files and memory after the documented load."""

    files: int
    weight_files: int
    loaded: int
    load_call: str
    fp_files: int | None
    fp16_loaded: int | None

    def sentence(self) -> str:
        """One line: the folder's bytes, its weight files' share of the FP16 model's, and the bytes after loading."""
        def share(a: int, b: int | None) -> str:
            return f", {100 * a / b:.0f}% of the FP16 model's {b:,}" if b else ""

        return (f"files: {self.files:,} bytes (du -b), weights {self.weight_files:,}"
                f"{share(self.weight_files, self.fp_files)}; after {self.load_call}: {self.loaded:,} bytes of "
                f"parameters and buffers{share(self.loaded, self.fp16_loaded)}")


def fp16_bytes(model: nn.Module) -> int:
    """What ``model`` holds with every floating-point tensor in float16 (its checkpoint's dtype for the bundled
    models), measured on its tensors: the reference the sentences compare with."""
    return _per_storage(model, lambda t: t.numel() * (2 if t.is_floating_point() else t.element_size()))


def size_report(folder: str | Path, plain: bool, fp_model: nn.Module | None = None,
                fp_folder: str | Path | None = None) -> SizeReport:
    """Measure a written export: ``plain`` formats are loaded with ``from_pretrained``, the packed one with
    :func:`qvlm.export.load_quantized` (whose kernels may hold dequantized weights: that is counted too)."""
    if plain:
        loaded, call = plain_load_bytes(folder), "plain from_pretrained"
    else:
        from qvlm.export.checkpoints import load_quantized

        handle = load_quantized(folder, device="cpu")
        loaded, call = resident_bytes(handle.model), f"qvlm.load_quantized ({handle.execution_path})"
        del handle
    fp_files = weight_file_bytes(fp_folder) or None if fp_folder is not None and Path(fp_folder).is_dir() else None
    return SizeReport(folder_bytes(folder), weight_file_bytes(folder), loaded, call, fp_files,
                      fp16_bytes(fp_model) if fp_model is not None else None)


def weight_file_bytes(folder: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files of ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
