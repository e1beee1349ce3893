"""Write an NF4 variant as a transformers bitsandbytes 4-bit checkpoint: plain ``from_pretrained`` loads ``Linear4bit``s.

Why this needs no re-quantization: the project already holds NF4 weights in bitsandbytes' own layout
(:mod:`qvlm.quant.packing`: codes in bnb's nibble order, one float32 absmax per block of the flattened
weight, bnb's NF4 table), so each packed layer is written as the tensors transformers' bnb 4-bit
quantizer deserializes into ``Params4bit.from_prequantized`` (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``), under a ``quantization_config`` with
``load_in_4bit`` and ``bnb_4bit_quant_type="nf4"``, no double quantization.

bitsandbytes quantizes weights only, so a W4A4 run loads as W4A16: its weights are the run's, bit for
bit, and its activations stay in floating point (the static ranges go to the activation sidecar).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from qvlm.export.layout import (
    ACTIVATION_SIDECAR,
    WEIGHTS,
    load_snippet,
    rotated_tower_note,
    in_dtype,
    unquantized_tensors,
    unshared,
    write_activation_sidecar,
    write_model_files,
    write_readme,
)
from qvlm.models import VLMHandle
from qvlm.quant.packing import PackedLinear, nf4_code, pack_model
from qvlm.quant.quantizers import BNB_BLOCKS, NF4_BLOCK
from qvlm.quant.recipes import resolve_weights

if TYPE_CHECKING:
    from qvlm.quant.config import QuantConfig

BITSANDBYTES = "bitsandbytes"
ROTATED_TOWER = ("nf4", "float")
"""How :func:`save_bitsandbytes` writes a Linear whose input the run rotates (``vision_rotation``), which a plain
loader cannot rotate: "nf4" (default), bitsandbytes' NF4 of its effective weight Q(W R) R^T (a second rounding;
4 bits in the file and in memory, like the rest); "float", the effective weight itself in the checkpoint's dtype
(exactly the run's W?A16 weights; the recommended preset's tower is then 46% of the easy-VQA file)."""
W4A16_NOTE = ("bitsandbytes quantizes weights only: the activations stay in floating point, so a W4A4 variant "
              "loads as W4A16 (its NF4 weights are the run's, bit for bit, except a rotated vision tower's: a plain "
              "loader cannot rotate, so those are NF4 of the un-rotated weight, rounded once more)")


def bitsandbytes_refusal(config: "QuantConfig") -> str | None:
    """Why a run of ``config`` cannot be written as a bitsandbytes 4-bit checkpoint, or None when it can."""
    if config.recipe == "fp":
        return f"{BITSANDBYTES} holds NF4 weights: the fp recipe quantizes nothing, so there is nothing to write."
    weights, group = resolve_weights(config)
    if weights != "nf4":
        return (f"{BITSANDBYTES} needs NF4 weights: this variant has {weights} (integer) weights "
                f"(recipe {config.recipe!r}); download it as compressed-tensors or qvlm-packed.")
    if config.w_bits != 4:
        return (f"{BITSANDBYTES} holds 4-bit NF4 only: this variant has {config.w_bits}-bit NormalFloat weights; "
                "download it as qvlm-packed.")
    if (group or NF4_BLOCK) not in BNB_BLOCKS:
        return (f"{BITSANDBYTES} takes NF4 blocks of {', '.join(map(str, BNB_BLOCKS))} weights: this variant uses "
                f"blocks of {group}; download it as qvlm-packed.")
    return None


def effective_weight(layer: PackedLinear) -> torch.Tensor:
    """The [out, in] weight a plain ``nn.Linear`` needs to compute what ``layer`` computes from unquantized inputs.

    A rotated layer (``vision_rotation``) stores Q(W R) and rotates its input by R, so the plain weight is
    Q(W R) R^T: a float weight, not NF4 (a rotation of NF4 levels is not NF4), hence written dense.
    """
    weight = layer.dequantized_weight()
    rotation = None if layer.act is None else layer.act.rotation
    return weight if rotation is None else weight @ rotation.to(weight.dtype).T


def save_bitsandbytes(handle: VLMHandle, out_dir: str | Path, config_dict: dict, stats: dict | None = None,
                      rotated_tower: str = "nf4") -> Path:
    """Write ``handle`` (NF4 PackedLinears, or packed here) as a bitsandbytes 4-bit checkpoint; return the folder.

    Every Linear the run left in floating point is named in ``llm_int8_skip_modules``, so transformers
    makes ``Linear4bit``s of exactly the run's NF4 layers. A layer whose input the run rotates (the vision
    tower under the recommended preset) is written as ``rotated_tower`` says (:data:`ROTATED_TOWER`): as NF4 codes
    of its un-rotated weight (:func:`effective_weight`), or as that weight in floating point and skipped too (an
    NF4 language model and a floating-point vision tower, as the authors' released code runs it). A NF4 layer
    whose width is not a multiple of its block is written as its dequantized floats (and skipped too): bitsandbytes 0.50's CPU kernel
    decodes blocks within each row, not over the flattened weight the codes were made on
    (:meth:`~qvlm.quant.packing.PackedLinear.dequantized_weight`), so it would compute another weight.

    Raises ValueError for what bitsandbytes cannot hold: uniform weights, NormalFloat at other than 4
    bits, AWQ smoothing (an input division), a block size bitsandbytes does not take.
    """
    from bitsandbytes.functional import pack_dict_to_tensor, quantize_4bit
    from transformers import BitsAndBytesConfig

    if rotated_tower not in ROTATED_TOWER:
        raise ValueError(f"rotated_tower must be one of {', '.join(ROTATED_TOWER)}, got {rotated_tower!r}")

    pack_model(handle.model)
    layers = {n: m for n, m in handle.model.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise ValueError(f"{BITSANDBYTES} holds NF4 weights, and this model has no quantized layer.")
    for name, m in layers.items():
        if m.fmt != "nf4" or m.bits != 4:
            raise ValueError(f"{BITSANDBYTES} holds 4-bit NF4 weights only, and this run stored {name} as "
                             f"{m.bits}-bit {m.fmt}; download it as qvlm-packed.")
        if m.smooth is not None:
            raise ValueError(f"{name} divides its input by AWQ smoothing scales, which {BITSANDBYTES} cannot hold; "
                             "download it as qvlm-packed.")
        if m.group not in BNB_BLOCKS:
            raise ValueError(f"{name}: NF4 block size {m.group} is not one bitsandbytes takes ({BNB_BLOCKS}).")
    rotated = {n for n, m in layers.items() if m.act is not None and m.act.rotation is not None}
    four_bit = {n: m for n, m in layers.items()
                if m.in_features % m.group == 0 and (n not in rotated or rotated_tower == "nf4")}
    dense = {n: m for n, m in layers.items() if n not in four_bit}
    requantized = rotated & set(four_bit)  # rotated layers written as NF4 of their effective weight
    dtype = handle.save_dtype  # the checkpoint's own (float16 for the bundled models), not the run's float32
    dtype_name = str(dtype).removeprefix("torch.")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in four_bit.items():
        if name in requantized:  # NF4 levels of the rotated weight are not NF4 levels of the plain one
            codes, state = quantize_4bit(effective_weight(m).float().cpu(), blocksize=m.group, quant_type="nf4")
            absmax = state.absmax
        else:
            codes, absmax = m.packed, m.scale
        tensors[f"{name}.weight"] = codes.detach().reshape(-1, 1).cpu()
        tensors[f"{name}.weight.absmax"] = absmax.detach().float().cpu()
        tensors[f"{name}.weight.quant_map"] = nf4_code(torch.device("cpu")).clone()
        tensors[f"{name}.weight.quant_state.bitsandbytes__nf4"] = pack_dict_to_tensor(
            {"quant_type": "nf4", "blocksize": m.group, "dtype": dtype_name, "shape": [m.out_features, m.in_features]})
    for name, m in dense.items():
        tensors[f"{name}.weight"] = in_dtype(effective_weight(m), dtype)
    for name, m in layers.items():
        if m.bias is not None:
            tensors[f"{name}.bias"] = in_dtype(m.bias, dtype)
    for key, t in unquantized_tensors(handle.model, layers, dtype).items():
        tensors.setdefault(key, t)
    skip = sorted([n for n, m in handle.model.named_modules() if isinstance(m, nn.Linear)] + list(dense))
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                 bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(unshared(tensors), str(out / WEIGHTS), metadata={"format": "pt"})
    write_model_files(handle, out, qconfig.to_dict())
    write_activation_sidecar(out, handle, layers, config_dict, stats, loader="bitsandbytes")
    (out / "qvlm_bitsandbytes.json").write_text(json.dumps(
        {"nf4_layers": sorted(four_bit), "dequantized_layers": sorted(dense),
         "requantized_layers": sorted(requantized), "rotated_tower": rotated_tower,
         "blocksize": sorted({m.group for m in layers.values()})}, indent=1))
    written = sorted(requantized if rotated_tower == "nf4" else rotated & set(dense))
    _write_readme(out, handle, config_dict, len(four_bit), sorted(set(dense) - set(written)),
                  rotated_tower_note(written, tensors, dtype, requantized=rotated_tower == "nf4") if written else None)
    return out


def _write_readme(out: Path, handle: VLMHandle, config_dict: dict, n_four_bit: int, unblocked: list[str],
                  rotated_note: str | None) -> None:
    label = f"W{config_dict.get('w_bits', 4)}A{config_dict.get('a_bits', 16)} {config_dict.get('recipe', '')}".strip()
    paragraphs = [
        f"{handle.name} quantized by Q-VLM Studio ({label}), written as a transformers bitsandbytes 4-bit "
        f"checkpoint: {n_four_bit} Linear layers load as `bitsandbytes.nn.Linear4bit` (NF4, blocks of 64, no "
        "double quantization), and stay 4-bit in memory; the layers the run kept in floating point stay so "
        "(`llm_int8_skip_modules`).",
        f"**W4A16:** {W4A16_NOTE}. The run's static activation ranges are in `{ACTIVATION_SIDECAR}`.",
        "Load it with plain transformers (with `bitsandbytes` and `accelerate` installed; CPU or GPU):",
        load_snippet(out.name),
    ]
    if rotated_note:
        paragraphs.append(rotated_note)
    if unblocked:
        paragraphs.append(f"{len(unblocked)} quantized layers are stored as floats with the same effective weights, "
                          "since their width is not a multiple of the block (bitsandbytes' CPU kernel blocks each "
                          "row): " + ", ".join(f"`{n}`" for n in unblocked))
    write_readme(out, f"{handle.name}: {label}, bitsandbytes NF4", paragraphs)
