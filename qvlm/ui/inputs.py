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
