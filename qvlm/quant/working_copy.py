"""The model copy that quantization works on, sharing the FP model's big tensors.

Why not ``copy.deepcopy``: the app keeps the FP model for side-by-side answers, and a full copy
doubles the weights on the device (LLaVA-1.5-7B: 2 x 14 GB before anything is quantized). Every
Linear and Embedding tensor is instead shared with the FP model through a *new* ``Parameter``
object: quantizing replaces that object's ``.data`` (never writes into the storage), so the FP
model is never touched, and a layer's FP weight stops being held twice the moment its quantized
form exists. Everything else (norms, buffers, activation ranges) is small and copied, so VEO may
train the vision tower's LayerNorms without reaching the FP model.
"""

from __future__ import annotations

import copy

from torch import nn

SHARED_MODULES = (nn.Linear, nn.Embedding)


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose Linear/Embedding parameters share storage with ``model``'s.

    Tied parameters (an ``lm_head`` tied to the input embeddings) stay tied in the copy.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, SHARED_MODULES):
            for param in module.parameters(recurse=False):
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def shared_bytes(a: nn.Module, b: nn.Module) -> int:
    """Bytes of parameter storage that ``a`` and ``b`` hold in common (what the copy did not duplicate)."""
    pointers = {p.data_ptr() for p in a.parameters()}
    return sum(p.numel() * p.element_size() for p in b.parameters() if p.data_ptr() in pointers)


__all__ = ["working_copy", "shared_bytes"]
