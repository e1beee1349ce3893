"""Answering questions about images with any loaded VLM (full precision or fake-quantized)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from qvlm.data import build_prompt


@dataclass(frozen=True)
class Answer:
    text: str
    seconds: float


def prepare_inputs(processor, images: list[Image.Image], questions: list[str], device: torch.device | str = "cpu"):
    """Processor inputs for a batch, left-padded so generation continues every row at the end."""
    prompts = [build_prompt(processor, q) for q in questions]
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous
    return batch.to(device)


@torch.inference_mode()
def generate_answers(
    model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers, one per (image, question) pair."""
    device = next(model.parameters()).device
    batch = prepare_inputs(processor, images, questions, device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer(model, processor, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
    """One answer and its wall-clock latency (what the Ask panel shows)."""
    start = time.perf_counter()
    text = generate_answers(model, processor, [image], [question], max_new_tokens)[0]
    return Answer(text, time.perf_counter() - start)
