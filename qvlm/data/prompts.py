"""Prompt format and answer scoring shared by training, calibration and evaluation.

Prompts always go through the processor's chat template, so the bundled model and hub
LLaVA checkpoints (each with its own template) use one code path.
"""

from __future__ import annotations

import re
import string
from typing import Any

MAX_QUESTION_CHARS = 500

_PUNCT = str.maketrans("", "", string.punctuation)


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    """A one-turn conversation with an image, in the transformers chat-message format."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def build_prompt(processor: Any, question: str) -> str:
    """The generation prompt (ending where the assistant's answer starts)."""
    return processor.apply_chat_template(chat_messages(question), add_generation_prompt=True)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and keep the first word: easy-VQA answers are one word."""
    words = text.lower().translate(_PUNCT).split()
    return words[0] if words else ""


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def validate_question(question: str | None) -> str:
    """Clean a user question or raise ValueError with a message fit for the UI/CLI."""
    q = re.sub(r"\s+", " ", question or "").strip()
    if not q:
        raise ValueError("Please type a question about the image.")
    if len(q) > MAX_QUESTION_CHARS:
        raise ValueError(f"The question is too long ({len(q)} characters; at most {MAX_QUESTION_CHARS}).")
    return q
