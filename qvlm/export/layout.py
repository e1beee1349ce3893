"""What every export folder shares, whatever its format: file names, the safetensors rules, the files beside the weights.

The writers (:mod:`qvlm.export.checkpoints` for qvlm-packed and compressed-tensors,
:mod:`qvlm.export.bitsandbytes`) all write one ``model.safetensors``, the model's config, generation
config and processor files, and (for formats a plain loader reads) the activation ranges the loader
does not apply and a README saying how to load the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qvlm.models import VLMHandle

WEIGHTS = "model.safetensors"
ACTIVATION_SIDECAR = "qvlm_activations.json"
README = "README.md"


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every storage held by one name only (safetensors refuses shared memory).

    Shared storage is normal here: AWQ gives q/k/v (and gate/up) one smoothing vector, and tied
    embeddings (Qwen2-0.5B) share the lm_head's weight. Later names get a copy; the loader re-ties
    embeddings by the config.
    """
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def in_dtype(t: torch.Tensor, dtype: torch.dtype, lossless_only: bool = False) -> torch.Tensor:
    """``t`` as an export writes it: a floating-point tensor in ``dtype`` (the checkpoint's own), others as they are.

    ``lossless_only``: keep ``t``'s dtype when ``dtype`` would round it. Why: the qvlm-packed format
    promises a reloaded model that answers exactly as the saved one; the FP weights a float32 run
    computes with came from a float16 checkpoint and round-trip, but a tensor the run changed (a norm
    a fold rescaled) may not, and then stays float32.
    """
    t = t.detach().contiguous().cpu()
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    cast = t.to(dtype)
    if lossless_only and not torch.equal(cast.to(t.dtype), t):
        return t
    return cast


def unquantized_tensors(model: torch.nn.Module, quantized: set[str] | dict, dtype: torch.dtype | None = None,
                        lossless_only: bool = False) -> dict[str, torch.Tensor]:
    """The state-dict tensors not owned by a module named in ``quantized``, floats in ``dtype``
    (:func:`in_dtype`; None: as they are)."""
    tensors = {}
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if not any(owner == n or owner.startswith(n + ".") for n in quantized):
            tensors[key] = t.detach().contiguous().cpu() if dtype is None else in_dtype(t, dtype, lossless_only)
    return tensors


def write_model_files(handle: VLMHandle, out: Path, quantization_config: dict | None = None) -> None:
    """The config (with ``quantization_config`` when given, and the checkpoint's dtype, which the floats are
    written in), generation config and processor files, so the folder loads without the base model."""
    config = handle.model.config.__class__.from_dict(handle.model.config.to_dict())
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = handle.save_dtype
    config.save_pretrained(out)
    handle.model.generation_config.save_pretrained(out)
    handle.processor.save_pretrained(out)


def write_activation_sidecar(out: Path, handle: VLMHandle, layers: dict[str, Any], config_dict: dict,
                             stats: dict | None, loader: str) -> None:
    """The run's static activation ranges, which ``loader`` does not apply, as :data:`ACTIVATION_SIDECAR`.

    The project's ranges are per input channel (language model) or per token position (vision tower);
    neither compressed-tensors (per-tensor static inputs) nor bitsandbytes (no activation quantization)
    has a place for them, so the folder loads as the run's W?A16 counterpart and the sidecar keeps the
    ranges for a tool that wants them.
    """
    modules = {name: {"bits": m.act.bits, "granularity": m.act.granularity,
                      "lo": m.act.lo.tolist(), "hi": m.act.hi.tolist()}
               for name, m in layers.items() if m.act is not None and m.act.calibrated}
    modules.update({name: {"bits": m.act.bits, "granularity": m.act.granularity, "clip": float(m.act.clip)}
                    for name, m in layers.items() if m.act is not None and m.act.dynamic and m.act.clip is not None})
    sidecar = {"applied_by_loader": False,
               "note": f"static activation ranges of the Q-VLM run, per input channel (language model) or per "
                       f"token position (vision tower); {loader} applies the weights only. x_hat = "
                       "(clamp(round(x / step) + zp, 0, 2^bits - 1) - zp) * step with step = (max(hi, 0) - "
                       "min(lo, 0)) / (2^bits - 1), zp = round(-min(lo, 0) / step); a dynamic (per-token) range with a clip "
                       "factor takes lo = clip * min, hi = clip * max of each row.",
               "base_model": handle.name, "task": handle.task, "quant_config": config_dict, "stats": stats or {},
               "modules": modules}
    (out / ACTIVATION_SIDECAR).write_text(json.dumps(sidecar, indent=1, default=str))


def write_readme(out: Path, title: str, paragraphs: list[str]) -> None:
    """A short README.md (a model card without metadata): what the folder holds and the one way to load it."""
    (out / README).write_text(f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n")


def rotated_tower_note(rotated: list[str], tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                       requantized: bool = False) -> str:
    """The README sentence for the layers whose input the run rotates (``vision_rotation``): what a plain loader
    runs there, and the bytes their written tensors take (measured on ``tensors``, the folder's). ``requantized``:
    written as NF4 codes of their effective weights (bitsandbytes' ``rotated_tower="nf4"``), else as floats."""
    def layer(key: str) -> str:  # "x.weight", "x.weight.absmax", "x.bias" -> "x"
        return key.split(".weight")[0] if ".weight" in key else key.rsplit(".", 1)[0]

    held = sum(t.numel() * t.element_size() for k, t in tensors.items() if layer(k) in rotated)
    start = (f"{len(rotated)} Linears of the vision tower take a rotated input in the run (`vision_rotation`). A "
             "quantized grid of the rotated weight is no grid of the un-rotated one, so ")
    if requantized:
        return start + ("they are written as NF4 codes of their effective weights Q(W R) R^T, quantized a second "
                        "time: a plain loader runs them as `Linear4bit` with no rotation and no activation "
                        f"quantization, on weights one rounding further from the run's, and they take {held:,} bytes "
                        "of the file (with `rotated_tower=\"float\"` they are written as those weights in floating "
                        "point, exactly the run's).")
    return start + ("they are written as their effective weights Q(W R) R^T in floating point: a plain loader runs "
                    "them as ordinary Linears with no rotation and no activation quantization, and their weights and "
                    f"biases take {held:,} bytes ({str(dtype).removeprefix('torch.')}) of the file.")


def load_snippet(folder_name: str, extra: str = "") -> str:
    """The plain-transformers load + generate lines a README shows (``extra``: arguments of from_pretrained)."""
    args = f'"{folder_name}"' + (f", {extra}" if extra else "")
    return ("```python\n"
            "from transformers import AutoProcessor, LlavaForConditionalGeneration\n\n"
            f"model = LlavaForConditionalGeneration.from_pretrained({args})\n"
            f'processor = AutoProcessor.from_pretrained("{folder_name}")\n'
            "inputs = processor(images=image, text=prompt, return_tensors=\"pt\")\n"
            "answer = model.generate(**inputs, max_new_tokens=8)\n"
            "```")


REPO_ROOT = Path(__file__).resolve().parents[2]


def shown_path(path: str | Path) -> str:
    """``path`` as a message for the user shows it: relative to the repository when inside it, else its name.

    Why: an app's error message must not tell a visitor where the server keeps its files.
    """
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return p.name or str(p)


def without_paths(err: BaseException | str, *paths: str | Path) -> str:
    """``str(err)`` with each of ``paths`` (as given, and resolved) written as :func:`shown_path` writes it."""
    text = str(err)
    for path in paths:
        for spelling in sorted({str(Path(path).resolve()), str(path)}, key=len, reverse=True):
            if spelling not in (".", ""):
                text = text.replace(spelling, shown_path(path))
    return text
