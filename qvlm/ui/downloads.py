"""The Quantize tab's downloads: a held variant as a zip in an export format, and its run as JSON.

No gradio here: the panel picks the variant and the session's folder, these functions write the
files. The export itself is :func:`qvlm.export.save_quantized` (the same call as the CLI's
``quantize --save DIR --format ...``); this module only zips its folder. Each kind of file has its
own slot (a subfolder of the session folder), replaced as a whole when a new file is written, so a
session keeps one zip per format and one run JSON however often it downloads, and a refused or
failed export leaves the previous file in place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvlm.export import FORMAT_NAME, SAVE_FORMATS, export_refusal, save_quantized, shown_path
from qvlm.export.sizes import SizeReport, measure_export, model_folder
from qvlm.quant.memory import weight_memory
from qvlm.ui.render import human_bytes
from qvlm.ui.state import Variant
from qvlm.ui.texts import EXPORT_FORMATS, EXPORT_RELOAD

RUN_SLOT = "run"
"""The slot of the run JSON (the zips' slots are named by their format)."""


def slug(text: str) -> str:
    """"W4A4 qvlm · vision FP" -> "w4a4-qvlm-vision-fp": safe in a file name on every system."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def file_stem(variant: Variant) -> str:
    """"tiny-llava-easyvqa-w4a4-rtn": the model's last name part (hub id, folder, "bundled: ...") and the label."""
    model, label = slug(re.split(r"[:/\\]", variant.base_model.rstrip("/\\"))[-1]), slug(variant.label)
    if model and label.startswith(model):  # labels that already name the model (panel_quantize.variant_label)
        model = ""
    return "-".join(part for part in (model, label) if part) or "model"


def format_menu(config: Any | None) -> tuple[list[tuple[str, str]], str, str | None]:
    """The format menu for a variant quantized with ``config`` (a ``QuantConfig``; None: no variant yet):
    (label, format) choices it can be written in, the one preselected, and why the others are missing.

    The reasons are :func:`qvlm.export.export_refusal`'s, the same sentences the CLI refuses ``--format``
    with, so the menu never offers a format whose download would then be refused.
    """
    formats = list(SAVE_FORMATS) if config is None else [f for f in SAVE_FORMATS if not export_refusal(config, f)]
    reasons = [] if config is None else [export_refusal(config, f) for f in SAVE_FORMATS if f not in formats]
    info = ("Not offered for this variant: " + " ".join(reasons)) if reasons else None
    return [(EXPORT_FORMATS.get(f, f), f) for f in formats], formats[0], info


def write_model_zip(variant: Variant, fmt: str, folder: Path, fp_model: Any | None = None) -> tuple[Path, SizeReport]:
    """``variant`` exported in ``fmt`` (:data:`qvlm.export.SAVE_FORMATS`) and zipped under ``folder / fmt``, and the
    export's bytes measured before zipping (:func:`qvlm.export.sizes.measure_export`: files, and memory after the
    documented load, next to ``fp_model``'s in float16).

    The zip holds one folder named like the zip, which is what ``load_quantized`` (packed) or
    ``from_pretrained`` (compressed-tensors) is given after unzipping. Raises ValueError with the
    exporter's sentence for the user when ``fmt`` cannot hold the recipe (NF4 weights or AWQ scales in
    compressed-tensors: :func:`qvlm.export.export_refusal`, asked before anything is written).
    """
    refusal = export_refusal(variant.result.config, fmt)
    if refusal:
        raise ValueError(refusal)
    stem = f"{file_stem(variant)}-{fmt}"
    config, stats = variant.result.config.to_dict(), variant.result.to_dict()

    measured: list[SizeReport] = []

    def write(staging: Path) -> str:
        export = save_quantized(variant.handle, staging / stem, config, stats, format=fmt)
        measured.append(measure_export(export, fmt != FORMAT_NAME, fp_model, model_folder(variant.base_model)))
        archive = staging / f"{stem}.zip"
        zip_folder(export, archive)
        shutil.rmtree(export)
        return archive.name

    return replace_slot(folder / fmt, write), measured[0]


def zip_folder(source: Path, archive: Path) -> None:
    """Zip ``source`` with its own name as the top folder, deflated at level 1.

    Level 1 because the weights are mostly packed codes: on the bundled model (W4A4 RTN) it makes the
    safetensors file 80% of its size in half the time of level 6, which reaches 79%.
    """
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(source.parent))


def run_record(variant: Variant, fp_evals: dict[tuple[str, int, int], Any]) -> dict:
    """The run as plain data: its ``QuantConfig``, what the run measured and how long it took, the weight
    memory, and every easy-VQA evaluation of the variant and of its FP model this session made (same
    questions for the same count and seed, so the two lists compare row by row)."""
    result = variant.result
    return {
        "variant": variant.label,
        "base_model": variant.base_model,
        "quant_config": result.config.to_dict(),
        "quantize_seconds": round(variant.seconds, 3),
        "weight_memory": weight_memory(variant.handle.model).to_dict(),
        "statistics": result.to_dict(),
        "evaluation": [{"questions": n, "seed": seed, **ev.to_dict()} for (n, seed), ev in variant.evals.items()],
        "fp_evaluation": [{"questions": n, "seed": seed, **ev.to_dict()}
                          for (model, n, seed), ev in fp_evals.items() if model == variant.base_model],
    }


def write_run_json(variant: Variant, record: dict, folder: Path) -> Path:
    """``record`` (:func:`run_record`) as an indented JSON file in the run slot of ``folder``."""
    name = f"{file_stem(variant)}-run.json"

    def write(staging: Path) -> str:
        (staging / name).write_text(json.dumps(record, indent=2, default=str))
        return name

    return replace_slot(folder / RUN_SLOT, write)


def failure_message(err: OSError) -> str:
    """A disk error for the user: its reason and the file's name, never the server's absolute path."""
    where = f" ({shown_path(err.filename)})" if getattr(err, "filename", None) else ""
    return f"Could not write the download: {err.strerror or type(err).__name__}{where}; nothing was lost."


def download_summary(label: str, fmt: str, model_zip: Path, run_json: Path, sizes: SizeReport) -> str:
    """The lines under the file boxes: which variant in which format, each file with its size, the unzipped
    folder's bytes measured (files and memory after its documented load), how to reload it."""
    files = " · ".join(f"`{p.name}`, {human_bytes(p.stat().st_size)}" for p in (model_zip, run_json))
    lines = [f"✓ `{label}` as **{fmt}**: {files}", f"Unzipped, measured here: {sizes.sentence()}.",
             EXPORT_RELOAD.get(fmt, "")]
    return "\n\n".join(line for line in lines if line)


def replace_slot(slot: Path, write: Callable[[Path], str]) -> Path:
    """Run ``write(staging)`` (it returns the name of the file it wrote) in a fresh folder beside ``slot``;
    only when it succeeds does that folder replace ``slot``. Returns the file's path in the slot.

    Why a staging folder: the previous file stays downloadable until the new one is complete, and a
    refused export costs the user nothing.
    """
    slot.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{slot.name}-staging-", dir=slot.parent))
    try:
        name = write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(slot, ignore_errors=True)
    staging.rename(slot)
    return slot / name
