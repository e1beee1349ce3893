"""The bytes a download really takes: on disk (as ``du -b`` counts them) and in memory after its documented load.

Why measured: "2,638,464 bytes packed" counted the packed Linears only, while the folder held float32 copies of
everything else and a plain ``from_pretrained`` decompressed it to twice the FP16 model. A sentence about size
must be the number a user sees, so these functions measure the folder and the loaded model, never shapes times bits.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from torch import nn

from qvlm.models import model_classes
from qvlm.quant.memory import fp16_bytes, resident_bytes


def folder_bytes(folder: str | Path) -> int:
    """Apparent bytes of ``folder`` and everything in it, directories included: what ``du -b -s`` prints."""
    folder = Path(folder)
    total = os.lstat(folder).st_size
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def answering_bytes(model: nn.Module, processor) -> int:
    """:func:`resident_bytes` after one greedy answer (a blank image, one new token): what the model holds while it
    answers. Why not only after loading: a compressed-tensors model holds packed codes until its first forward
    call, which decompresses every Linear."""
    from PIL import Image

    from qvlm.models.inference import generate_answers

    generate_answers(model, processor, [Image.new("RGB", (32, 32))], ["What is in the image?"], max_new_tokens=1)
    return resident_bytes(model)


def plain_load(folder: str | Path):
    """``<Model>.from_pretrained(folder)`` with no other argument (what an export's README tells a user to type), on
    the CPU, in eval mode, and its processor."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    model = model_classes()[config.model_type].from_pretrained(folder, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(folder, local_files_only=True)


def plain_load_bytes(folder: str | Path) -> tuple[int, int]:
    """(:func:`resident_bytes` after :func:`plain_load`, :func:`answering_bytes` of that model)."""
    model, processor = plain_load(folder)
    loaded = resident_bytes(model)
    return loaded, answering_bytes(model, processor)


@dataclass(frozen=True)
class SizeReport:
    """A saved variant's bytes next to its FP model's: files and memory after the documented load and while answering."""

    files: int
    weight_files: int
    loaded: int
    answering: int
    load_call: str
    fp_files: int | None
    fp16_loaded: int | None

    def memory_sentence(self) -> str:
        """The bytes in memory after the documented load, and while answering where that differs."""
        held = f"after {self.load_call}: {self.loaded:,} bytes of parameters and buffers" + share(
            self.loaded, self.fp16_loaded)
        if self.answering != self.loaded:
            held += f"; while answering: {self.answering:,} bytes{share(self.answering, self.fp16_loaded)}"
        return held

    def sentence(self) -> str:
        """One line: the folder's bytes, its weight files' share of the FP16 model's, and the bytes in memory."""
        return f"files: {self.files:,} bytes (du -b), {self.weights_sentence()}; {self.memory_sentence()}"

    def weights_sentence(self) -> str:
        """The weight files' bytes next to the FP16 model's."""
        return f"weights {self.weight_files:,}{share(self.weight_files, self.fp_files)}"


def share(a: int, b: int | None) -> str:
    """", 42% of the FP16 model's 9,041,792" (nothing when the reference is unknown)."""
    return f", {100 * a / b:.0f}% of the FP16 model's {b:,}" if b else ""


def size_report(folder: str | Path, plain: bool, fp_model: nn.Module | None = None,
                fp_folder: str | Path | None = None) -> SizeReport:
    """Measure a written export: ``plain`` formats are loaded with ``from_pretrained``, the packed one with
    :func:`qvlm.export.load_quantized` (whose kernels may hold dequantized weights: that is counted too)."""
    if plain:
        (loaded, answering), call = plain_load_bytes(folder), "plain from_pretrained"
    else:
        from qvlm.export.checkpoints import load_quantized

        handle = load_quantized(folder, device="cpu")
        loaded, call = resident_bytes(handle.model), f"qvlm.load_quantized ({handle.execution_path})"
        answering = answering_bytes(handle.model, handle.processor)
        del handle
    fp_files = weight_file_bytes(fp_folder) or None if fp_folder is not None and Path(fp_folder).is_dir() else None
    return SizeReport(folder_bytes(folder), weight_file_bytes(folder), loaded, answering, call, fp_files,
                      fp16_bytes(fp_model) if fp_model is not None else None)


def measure_export(folder: str | Path, plain: bool, fp_model: nn.Module | None = None,
                   fp_folder: str | Path | None = None) -> SizeReport:
    """:func:`size_report` of a written export, whose README then gains a "Size (measured)" section; the folder's
    bytes are measured after that, so the report's ``files`` is what ``du -b`` prints for the folder as shipped."""
    from qvlm.export.layout import README

    report = size_report(folder, plain, fp_model, fp_folder)
    readme = Path(folder) / README
    with readme.open("a") as f:
        f.write(f"\n## Size (measured)\n\nWeight files (safetensors): {report.weight_files:,} bytes"
                f"{share(report.weight_files, report.fp_files)}. In memory, "
                f"{report.memory_sentence()}.\n")
    return dataclasses.replace(report, files=folder_bytes(folder))


def model_folder(name: str) -> Path | None:
    """The local folder of the model called ``name`` (bundled or a folder), None for a hub id or an unknown name:
    where the FP16 model's weight files are read from."""
    from qvlm.models import ModelLoadError
    from qvlm.models.loader import resolve_source

    try:
        location, source = resolve_source(name)
    except ModelLoadError:
        return None
    return None if source == "hub" else Path(location)


def weight_file_bytes(folder: str | Path) -> int:
    """Bytes of the ``*.safetensors`` files of ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
