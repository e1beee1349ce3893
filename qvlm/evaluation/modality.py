"""Image tokens vs text tokens: activation ranges at every decoder layer's input, per modality.

The observation behind modality-balanced quantization: the image tokens a projector hands the
LLM and the text tokens around them reach the decoder with very different magnitudes, so one
clipping range per channel fits one modality at the other's cost. This measures it on a few
calibration pairs: per decoder layer and modality, the 99.9th percentile and the maximum of |x|.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from qvlm.utils.progress import STAGE_MODALITY, ProgressCallback, check_cancel, report
from qvlm.quant.calibration import calibration_batches
from qvlm.utils.stats import finite


MODALITIES = ("image", "text")


@dataclass(frozen=True)
class TokenRange:
    """|x| of one modality's tokens at a decoder layer's input: a high percentile, the maximum, and the count."""

    p: float
    max: float
    tokens: int


@dataclass(frozen=True)
class ModalityRow:
    """One decoder layer's input: the image tokens' and the text tokens' ranges (``percentile``: of |x|)."""

    layer: int
    percentile: float
    image: TokenRange
    text: TokenRange

    @property
    def ratio(self) -> float | None:
        """Image / text |x| percentile, rounded as the table shows it; None where text has no range."""
        if not (finite(self.image.p) and finite(self.text.p)) or self.text.p <= 0:
            return None
        return round(self.image.p / self.text.p, 2)


def image_token_id(config: Any) -> int:
    """The id a LLaVA config gives the image placeholder tokens (transformers spells the field two ways)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError("This model's config names no image token, so image and text tokens cannot be told apart.")


def _abs_quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of |x| (all elements); exact, on a subsample of at most 2^24 values."""
    flat = x.abs().float().flatten()
    if flat.numel() == 0:
        return float("nan")
    if flat.numel() > 2**24:
        flat = flat[torch.randperm(flat.numel(), device=flat.device)[: 2**24]]
    return float(torch.quantile(flat, q))


@torch.no_grad()
def modality_activation_stats(
    handle: Any,
    n_pairs: int = 8,
    percentile: float = 99.9,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> list[ModalityRow]:
    """Per decoder layer: |x| percentile and max of image tokens and of text tokens at the layer's input.

    ``n_pairs`` calibration pairs (easy-VQA train, prompt + answer) go through the model in one
    batch; padding is excluded. One row per decoder layer.
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or not 1 <= n_pairs <= 64:
        raise ValueError("Use 1 to 64 calibration pairs for the modality statistics.")
    if not 0 < percentile <= 100:
        raise ValueError("The percentile must be above 0 and at most 100.")
    image_id = image_token_id(handle.config)
    layers = [entry.module for entry in handle.layer_map.language]
    check_cancel(cancel, "modality statistics")
    (batch,) = calibration_batches(handle, n_pairs, seed, batch_size=n_pairs)  # one batch: exact percentiles
    is_image = batch.input_ids == image_id
    masks = {"image": is_image & batch.valid, "text": ~is_image & batch.valid}
    rows: list[ModalityRow | None] = [None] * len(layers)

    def make_hook(i: int):
        def hook(module, args, kwargs):
            check_cancel(cancel, "modality statistics")
            hidden = args[0] if args else kwargs["hidden_states"]
            ranges = {}
            for m in MODALITIES:
                x = hidden[masks[m]]  # reduced at once: no layer's activations are kept
                ranges[m] = TokenRange(_abs_quantile(x, percentile / 100),
                                       float(x.abs().max()) if x.numel() else float("nan"), int(x.shape[0]))
            rows[i] = ModalityRow(i, percentile, **ranges)
            report(progress, STAGE_MODALITY, (i + 1) / len(layers), f"decoder layer {i}")

        return hook

    hooks = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        handle.model(**batch.model_inputs(), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return rows
