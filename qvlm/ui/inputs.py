"""Form values -> numbers, with the message a person sees when one is out of range."""

from __future__ import annotations

import math
from typing import Any

from qvlm.data import load_split


def parse_question_count(value: Any, purpose: str = "") -> int:
    """A count of test questions as an int; ValueError naming the allowed range otherwise."""
    n_test = len(load_split("test"))
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = math.nan
    if not n.is_integer() or not 1 <= n <= n_test:
        raise ValueError(f"Choose between 1 and {n_test} test questions{purpose}.")
    return int(n)
