"""Calibration data and layer-by-layer execution on cached inputs.

Why layer by layer: the quantizer only ever needs one transformer layer's inputs for the whole
calibration set in memory (plus its FP reference), so the same code scales from the bundled
model on a CPU to a 7B model on one GPU. The inputs of the first layer of each tower are
captured once with a forward pre-hook (which then stops the forward); every later layer is
called directly with the captured keyword arguments (attention mask, rotary embeddings).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator

import torch
from torch import nn

from qvlm.data import VQASample, build_prompt, chat_messages, get_task
from qvlm.utils.progress import check_cancel


@dataclass
class CalibBatch:
    """Teacher-forced prompt + answer sequences, right-padded; ``answer_mask`` marks answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    answer_mask: torch.Tensor
    image_sizes: torch.Tensor | None = None
    """(height, width) per image, for families that tile images (LLaVA-NeXT); None otherwise."""

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def split(self, rows: int) -> list["CalibBatch"]:
        """Consecutive row slices of at most ``rows`` pairs (micro-batches), same padding."""
        if rows >= self.size:
            return [self]
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return [CalibBatch(**{name: None if t is None else t[start : start + rows] for name, t in tensors.items()})
                for start in range(0, self.size, rows)]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}
        return inputs | self.image_inputs()

    def image_inputs(self) -> dict[str, torch.Tensor]:
        """Extra image inputs a family needs besides ``pixel_values`` (``get_image_features`` too)."""
        return {} if self.image_sizes is None else {"image_sizes": self.image_sizes}


def _encode(processor, sample: VQASample) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """(input ids of prompt+answer, pixel values, number of answer tokens at the end, image size or None)."""
    image = sample.load_image()
    full_text = processor.apply_chat_template(chat_messages(sample.question, sample.answer))
    prompt_text = build_prompt(processor, sample.question)
    full = processor(images=[image], text=[full_text], return_tensors="pt")
    prompt_ids = processor(images=[image], text=[prompt_text], return_tensors="pt")["input_ids"][0]
    ids = full["input_ids"][0]
    n_prompt = len(prompt_ids)
    if n_prompt >= len(ids) or not torch.equal(ids[:n_prompt], prompt_ids):
        # Tokenizers that merge across the prompt/answer boundary: count the answer on its own.
        n_answer = len(processor.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) + 1
        n_prompt = max(1, len(ids) - n_answer)
    sizes = full["image_sizes"][0] if "image_sizes" in full else None
    return ids, full["pixel_values"][0], len(ids) - n_prompt, sizes


def _stack_padded(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image pixel tensors; tiled families (LLaVA-NeXT) may differ in their number of
    tiles, so pad the leading dim with zeros as their processors do."""
    if all(p.shape == pixels[0].shape for p in pixels):
        return torch.stack(pixels)
    n = max(p.shape[0] for p in pixels)
    return torch.stack([torch.cat([p, p.new_zeros((n - p.shape[0], *p.shape[1:]))]) for p in pixels])


def build_batches(processor, samples: list[VQASample], batch_size: int,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[CalibBatch]:
    """Right-padded batches (pads after the real tokens, so causal attention never sees them)."""
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id or 0
    encoded = [_encode(processor, s) for s in samples]
    batches = []
    for at in range(0, len(encoded), batch_size):
        chunk = encoded[at : at + batch_size]
        length = max(len(ids) for ids, _, _, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        answer = torch.zeros((len(chunk), length), dtype=torch.bool)
        for i, (row, _, n_answer, _) in enumerate(chunk):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            answer[i, len(row) - n_answer : len(row)] = True
        pixels = _stack_padded([p for _, p, _, _ in chunk]).to(device=device, dtype=dtype)
        sizes = [s for _, _, _, s in chunk]
        image_sizes = torch.stack(sizes).to(device) if sizes[0] is not None else None
        batches.append(CalibBatch(ids.to(device), mask.to(device), pixels, answer.to(device), image_sizes))
    return batches


def calibration_batches(handle, size: int, seed: int, batch_size: int) -> list[CalibBatch]:
    """The paper's calibration set: ``size`` random image-question-answer pairs of the *train* split
    of the model's own task."""
    samples = get_task(handle.task).calibration_split(size, seed)
    return build_batches(handle.processor, samples, batch_size, handle.device, handle.dtype)


# ----------------------------------------------------------------------------------------------
# capturing layer inputs
# ----------------------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass
class LayerInputs:
    """What one layer receives for every calibration batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: list[nn.Module], batches: list[CalibBatch],
                         token_masks: list[bool], cancel=None) -> list[LayerInputs]:
    """Run ``model`` on every batch and record each layer's input; the forward stops after the last.

    ``token_masks[i]`` says whether layer i sees the text sequence (so the padding mask applies).
    """
    captured = [LayerInputs() for _ in layers]
    current: dict[str, CalibBatch] = {}

    def make_hook(i: int):
        def hook(module, args, kwargs):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            captured[i].hidden.append(hidden.detach())
            captured[i].args.append(rest)
            captured[i].kwargs.append(dict(kwargs))
            captured[i].masks.append(current["batch"].valid if token_masks[i] else None)
            if i == len(layers) - 1:
                raise StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            check_cancel(cancel, "quantization")
            current["batch"] = batch
            try:
                model(**batch.model_inputs(), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return captured


def call_layer(layer: nn.Module, x: torch.Tensor, inputs: LayerInputs, i: int) -> torch.Tensor:
    y = layer(x, *inputs.args[i], **inputs.kwargs[i])
    return y[0] if isinstance(y, tuple) else y


def run_layer(layer: nn.Module, inputs: LayerInputs, xs: list[torch.Tensor] | None = None,
              cancel=None) -> list[torch.Tensor]:
    """Apply ``layer`` to every cached batch (``xs`` replaces the cached hidden states)."""
    xs = inputs.hidden if xs is None else xs
    outs = []
    for i, x in enumerate(xs):
        check_cancel(cancel, "quantization")
        outs.append(call_layer(layer, x, inputs, i))
    return outs


# ----------------------------------------------------------------------------------------------
# errors and observation
# ----------------------------------------------------------------------------------------------
def per_sample_mse(y: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample ([B]), over valid tokens and all channels."""
    sq = (y.float() - ref.float()).pow(2).mean(dim=-1)  # [B, T]
    if mask is None:
        return sq.mean(dim=-1)
    m = mask.to(sq.dtype)
    return (sq * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One MSE over every valid token of the batch (a scalar that keeps its graph, for losses).

    Unlike ``per_sample_mse(...).mean()`` each token weighs the same, whatever its sample's length.
    """
    sq = (a.float() - b.float()).pow(2).mean(dim=-1)
    if mask is None:
        return sq.mean()
    m = mask.float()
    return (sq * m).sum() / m.sum().clamp_min(1)


def per_sample_power(ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return per_sample_mse(ref, torch.zeros_like(ref), mask)


def mse_over(ys: list[torch.Tensor], refs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """Per-sample errors of every batch, concatenated ([N])."""
    return torch.cat([per_sample_mse(y, r, m) for y, r, m in zip(ys, refs, masks)])


@contextmanager
def observing(quantizers: Iterable) -> Iterator[None]:
    qs = list(quantizers)
    for q in qs:
        q.records = []
        q.observing = True
    try:
        yield
    finally:
        for q in qs:
            q.observing = False


def release_records(quantizers: Iterable) -> None:
    for q in quantizers:
        q.records = []
