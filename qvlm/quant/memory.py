"""Weight memory: what a model takes stored as FP16 vs with its quantized weights packed.

For a :class:`~qvlm.quant.packing.PackedLinear` (the default result of ``quantize``) the count is
the bytes the layer really holds (codes, steps, zero points). For a fake-quant
:class:`QuantLinear` (``pack_weights=False``) it is what packing that layer would hold
(:func:`~qvlm.quant.packing.packed_weight_bytes`), so both columns agree whether or not a run packs.
Unquantized tensors count at FP16 in both columns.
"""

from __future__ import annotations

from torch import nn

from qvlm.models import build_layer_map
from qvlm.quant.packing import PackedLinear, packed_weight_bytes
from qvlm.quant.qlinear import QuantLinear

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


def weight_memory(model: nn.Module) -> dict:
    """{"fp16_bytes", "quant_bytes", "by_family": {family: {"params", "fp16_bytes", "quant_bytes"}}}."""
    fam = {f: {"params": 0, "fp16_bytes": 0, "quant_bytes": 0} for f in FAMILIES}
    projector_name = build_layer_map(model).projector_name
    counted: set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            f = _family(mod_name, projector_name)
            n = module.out_features * module.in_features
            fam[f]["params"] += n
            fam[f]["fp16_bytes"] += 2 * n
            fam[f]["quant_bytes"] += module.storage_bytes()
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in counted:
                continue
            counted.add(id(param))
            f = _family(f"{mod_name}.{p_name}", projector_name)
            n = param.numel()
            fam[f]["params"] += n
            fam[f]["fp16_bytes"] += 2 * n
            if isinstance(module, QuantLinear) and p_name == "weight" and module.weight_quantized:
                q = packed_weight_bytes((module.out_features, module.in_features), module.w_bits,
                                        module.w_format, module.w_group)
            elif p_name == "weight" and getattr(module, "_qvlm_w_bits", None):
                q = packed_weight_bytes(tuple(param.shape), module._qvlm_w_bits, "uniform", None)
            else:
                q = 2 * n
            fam[f]["quant_bytes"] += q
    return {
        "fp16_bytes": sum(v["fp16_bytes"] for v in fam.values()),
        "quant_bytes": sum(v["quant_bytes"] for v in fam.values()),
        "by_family": {k: v for k, v in fam.items() if v["params"]},
    }
