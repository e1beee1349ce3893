"""Reference models the recipes are compared against, loaded the way their users load them.

``bnb-nf4``: transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, the
usual way a LLaVA is quantized today. Weights only (activations stay in floating point), NF4 blocks
of 64 without double quantization, every Linear that transformers converts by default (it keeps
``lm_head``), computing in float32 on the CPU. Needs ``accelerate`` (transformers asks for it with
any quantization config).
"""

from __future__ import annotations

import os

import torch

from qvlm.data.tasks import DEFAULT_TASK, task_of_model_folder
from qvlm.models import VLMHandle, build_layer_map, model_classes
from qvlm.models.loader import load_config, resolve_source

BNB_NF4 = "bnb-nf4"
BNB_NF4_LABEL = "bnb-nf4: transformers load_in_4bit (weights only)"


def load_bnb_nf4(name_or_path: str | os.PathLike = "bundled", dtype: torch.dtype = torch.float32) -> VLMHandle:
    """The checkpoint loaded through transformers' real ``BitsAndBytesConfig`` 4-bit path, on the CPU.

    Its Linears are ``bitsandbytes.nn.Linear4bit``; the handle works with :func:`qvlm.evaluation.accuracy.evaluate`.
    """
    from transformers import AutoProcessor, BitsAndBytesConfig

    location, source = resolve_source(name_or_path, None)
    local_only = source != "hub"
    config = load_config(location, source)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                             bnb_4bit_use_double_quant=False)
    processor = AutoProcessor.from_pretrained(location, trust_remote_code=False, local_files_only=local_only)
    model = model_classes()[config.model_type].from_pretrained(
        location, quantization_config=bnb, dtype=dtype, device_map="cpu", trust_remote_code=False,
        local_files_only=local_only)
    model.eval()
    model.requires_grad_(False)
    return VLMHandle(model=model, processor=processor, layer_map=build_layer_map(model),
                     name=f"{BNB_NF4}: {name_or_path}", source=source,
                     task=DEFAULT_TASK if source == "hub" else task_of_model_folder(location))
