"""Answering questions about images with any loaded VLM (full precision or fake-quantized)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image

from qvlm.data import build_prompt, chat_messages


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
def generate_token_ids(
    model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8
) -> torch.Tensor:
    """Greedy new tokens, [B, steps]; rows that stopped early are padded with the pad token."""
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
    return out[:, batch["input_ids"].shape[1] :]


def generate_answers(
    model, processor, images: list[Image.Image], questions: list[str], max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers, one per (image, question) pair."""
    new_tokens = generate_token_ids(model, processor, images, questions, max_new_tokens)
    return [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_token_ids(processor, question: str, answer: str) -> list[int]:
    """The tokens the model emits for ``answer`` after the prompt of ``question`` (end-of-turn tokens dropped).

    Read off the chat template's full conversation, so the answer is tokenized as it follows the
    prompt (a BPE tokenizer spells "circle" after "ASSISTANT:" with its leading space).
    """
    tokenizer = processor.tokenizer
    prompt = tokenizer(build_prompt(processor, question))["input_ids"]
    full = tokenizer(processor.apply_chat_template(chat_messages(question, answer)))["input_ids"]
    if full[: len(prompt)] == prompt:
        ids = full[len(prompt) :]
    else:  # a tokenizer that merges across the prompt/answer boundary: the answer on its own
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return list(ids)


@torch.inference_mode()
def continuation_probs(
    model, processor, images: list[Image.Image], questions: list[str], continuations: list[list[int]]
) -> list[torch.Tensor]:
    """Teacher-forced next-token probabilities, one [len(continuation), vocab] tensor per pair.

    Row j of pair i is the distribution the model gives for token j of ``continuations[i]`` after the
    prompt and tokens 0..j-1 of it: with every model fed the same continuation, the steps line up.
    Prompts are left-padded and continuations right-padded; causal attention never lets a pad
    influence a real token, and RoPE only sees relative positions, so the shift of a left-padded
    row changes nothing.
    """
    device = next(model.parameters()).device
    batch = prepare_inputs(processor, images, questions, device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
    longest = max((len(c) for c in continuations), default=0)
    if longest == 0:
        return [torch.zeros(0, 0) for _ in continuations]
    pad = processor.tokenizer.pad_token_id or 0
    ids = torch.full((len(continuations), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(continuations):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    n_prompt = batch["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([batch["input_ids"], ids], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], mask], dim=1)
    logits = model(**batch, use_cache=False).logits[:, n_prompt - 1 : n_prompt - 1 + longest]
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    return [probs[i, : len(c)] for i, c in enumerate(continuations)]


def answer(model, processor, image: Image.Image, question: str, max_new_tokens: int = 32) -> Answer:
    """One answer and its wall-clock latency (what the Ask panel shows)."""
    start = time.perf_counter()
    text = generate_answers(model, processor, [image], [question], max_new_tokens)[0]
    return Answer(text, time.perf_counter() - start)
