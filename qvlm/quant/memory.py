"""Bytes: what a model holds in memory, measured on its storages (:func:`resident_bytes`, and :func:`fp_model_bytes`,
the FP model's, the cap on what a variant's kernels may hold), and weight memory: stored as FP16 vs packed.

For a :class:`~qvlm.quant.packing.PackedLinear` (the default result of ``quantize``) the count is
the bytes the layer really holds (codes, steps, zero points). For a fake-quant
:class:`QuantLinear` (``pack_weights=False``) it is what packing that layer would hold
(:func:`~qvlm.quant.packing.packed_weight_bytes`), so both columns agree whether or not a run packs.
Unquantized tensors count at FP16 in both columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from qvlm.models import build_layer_map
from qvlm.quant.packing import PackedLinear, packed_weight_bytes
from qvlm.quant.qlinear import QuantLinear
from qvlm.quant.quantizers import ActQuantizer


def _per_storage(model: nn.Module, size: Callable[[torch.Tensor], int], skip: frozenset[int] = frozenset()) -> int:
    """The sum of ``size`` over ``model``'s parameters and buffers, each storage counted once (tied weights and the
    vision rotation every layer of a width shares are one), the largest size seen for it; storages in ``skip``
    (data pointers) not at all."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_meta or (key := t.untyped_storage().data_ptr()) in skip:
            continue
        seen[key] = max(seen.get(key, 0), size(t))
    return sum(seen.values())


def resident_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers as held in memory: measured on its storages, not shapes times bits."""
    return _per_storage(model, lambda t: t.untyped_storage().nbytes())


def fp16_bytes(model: nn.Module) -> int:
    """What ``model`` holds with every floating-point tensor in float16 (its checkpoint's dtype for the bundled
    models), measured on its tensors: the reference the sentences compare with."""
    return _per_storage(model, lambda t: t.numel() * (2 if t.is_floating_point() else t.element_size()))


def fp_model_bytes(model: nn.Module) -> int:
    """What the FP model ``model`` was quantized from holds as it answers here, measured on ``model``'s own tensors:
    each quantized Linear's weight in its compute dtype (float32 on a CPU), its bias and every unquantized tensor as
    held, the quantizers' own tensors (codes, steps, ranges, rotations, held copies) not at all.

    Why: the bar a quantized model's memory must stay under (:func:`qvlm.quant.integer.to_integer_path` holds
    dequantized weights only within it) is the model a user would otherwise run, not its FP16 file."""
    quantized = [m for m in model.modules() if getattr(m, "weight_quantized", False) and hasattr(m, "compute_dtype")]
    own = frozenset(t.untyped_storage().data_ptr()
                    for m in (*quantized, *(a for a in model.modules() if isinstance(a, ActQuantizer)))
                    for name, t in (*m.named_buffers(recurse=False), *m.named_parameters(recurse=False))
                    if t is not None and name != "bias")
    held = _per_storage(model, lambda t: t.untyped_storage().nbytes(), skip=own)
    return held + sum(dequantized_bytes(m) for m in quantized)


def dequantized_bytes(layer: nn.Module) -> int:
    """Bytes of a quantized Linear's weight in its compute dtype: what holding it dequantized costs."""
    return layer.out_features * layer.in_features * layer.compute_dtype.itemsize


FAMILIES = ("vision", "projector", "language", "embeddings", "lm_head", "other")


def _family(name: str, projector_name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if name == projector_name or name.startswith(projector_name + "."):
        return "projector"
    if name.startswith("lm_head") or ".lm_head" in name:
        return "lm_head"
    if "embed_tokens" in name:
        return "embeddings"
    if "language_model" in name:
        return "language"
    return "other"


@dataclass(frozen=True)
class WeightBytes:
    """Parameters of one part of the model, and their bytes in FP16 and as the variant stores them."""

    params: int = 0
    fp16_bytes: int = 0
    quant_bytes: int = 0

    def __add__(self, other: "WeightBytes") -> "WeightBytes":
        return WeightBytes(self.params + other.params, self.fp16_bytes + other.fp16_bytes,
                           self.quant_bytes + other.quant_bytes)


@dataclass(frozen=True)
class WeightMemory:
    """The weights' bytes by part of the model (:data:`FAMILIES`, the parts that hold any), computed from shapes
    and formats: what the packed codes take, not what a process holds (that is :func:`resident_bytes`)."""

    by_family: dict[str, WeightBytes]

    @property
    def fp16_bytes(self) -> int:
        return sum(v.fp16_bytes for v in self.by_family.values())

    @property
    def quant_bytes(self) -> int:
        return sum(v.quant_bytes for v in self.by_family.values())

    def to_dict(self) -> dict[str, Any]:
        return {"fp16_bytes": self.fp16_bytes, "quant_bytes": self.quant_bytes,
                "by_family": {k: asdict(v) for k, v in self.by_family.items()}}


def weight_memory(model: nn.Module) -> WeightMemory:
    """Every parameter and packed Linear of ``model`` counted once, by family."""
    fam = {f: WeightBytes() for f in FAMILIES}
    projector_name = build_layer_map(model).projector_name
    counted: set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            f = _family(mod_name, projector_name)
            n = module.out_features * module.in_features
            fam[f] += WeightBytes(n, 2 * n, module.storage_bytes())
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in counted:
                continue
            counted.add(id(param))
            f = _family(f"{mod_name}.{p_name}", projector_name)
            n = param.numel()
            if isinstance(module, QuantLinear) and p_name == "weight" and module.weight_quantized:
                q = packed_weight_bytes((module.out_features, module.in_features), module.w_bits,
                                        module.w_format, module.w_group)
            elif p_name == "weight" and getattr(module, "_qvlm_w_bits", None):
                q = packed_weight_bytes(tuple(param.shape), module._qvlm_w_bits, "uniform", None)
            else:
                q = 2 * n
            fam[f] += WeightBytes(n, 2 * n, q)
    return WeightMemory({k: v for k, v in fam.items() if v.params})
