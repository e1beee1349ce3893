"""Form values -> numbers, with the message a person sees when one is out of range."""

from __future__ import annotations

import math
from typing import Any


def parse_question_count(value: Any, limit: int, purpose: str = "") -> int:
    """A count of test questions as an int in 1..``limit``; ValueError naming the allowed range otherwise.

    ``limit`` is the size of the picked model's test split (each task has its own), so the check can
    only be made once the model is known.
    """
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = math.nan
    if not n.is_integer() or not 1 <= n <= limit:
        raise ValueError(f"Choose between 1 and {limit} test questions{purpose}.")
    return int(n)


def parse_count(value: Any, low: int, high: int, what: str) -> int:
    """A whole number in ``low``..``high`` as an int (8.0 -> 8); ValueError naming the range otherwise.

    Why here and not in the number box: a box with ``precision=0`` rounds 2.5 to 2 before any
    handler sees it, so the boxes pass the typed value and this refuses it.
    """
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = math.nan
    if not n.is_integer() or not low <= n <= high:
        raise ValueError(f"{what} must be a whole number from {low} to {high}.")
    return int(n)
