"""The measured Table 4 (``benchmarks/table4.py`` writes one JSON per kind of CPU) as typed records.

Why typed: the file comes from another run, perhaps another machine and an older version of the benchmark, so
every key it may lack gets its default here, once, instead of at each place the Results tab reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlm.quant.kernels import cpu_kind
from qvlm.utils.records import JsonRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredOn(JsonRecord):
    """The machine a speed figure holds for: without its flags and thread count a latency says little."""

    cpu: str = "unknown CPU"
    isa: tuple[str, ...] = ()
    torch: str = "?"
    threads: int | str = "?"
    date: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "isa", tuple(self.isa))  # JSON holds a list


@dataclass(frozen=True)
class Table4Row:
    """One storage format's latency and weight memory for one layer's Linears at one token count."""

    layer: str
    format: str
    seconds: float
    weight_bytes: int
    speedup_vs_fp32: float
    memory_saving_vs_fp32: float
    tokens: int | None = None

    @property
    def group(self) -> str:
        """One bar group per layer and token count."""
        return self.layer if self.tokens is None else f"{self.layer}, {self.tokens} tokens"


@dataclass(frozen=True)
class Table4Result:
    """A stored Table 4 run; ``kind`` is the CPU kind its file is named for, ``skipped`` the rows that did not run."""

    kind: str
    machine: MeasuredOn
    rows: tuple[Table4Row, ...]
    tokens: tuple[int, ...] = ()
    repeats: int | None = None
    small: bool = False
    skipped: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kind: str) -> "Table4Result":
        rows = d.get("rows", ())
        measured = [r for r in rows if "error" not in r]
        tokens = d.get("tokens", ())
        return cls(
            kind=kind, machine=MeasuredOn.from_dict(d.get("machine", {})),
            rows=tuple(Table4Row(layer=r["layer"], format=r["format"], seconds=float(r["seconds"]),
                                 weight_bytes=int(r["weight_bytes"]), speedup_vs_fp32=float(r["speedup_vs_fp32"]),
                                 memory_saving_vs_fp32=float(r["memory_saving_vs_fp32"]), tokens=r.get("tokens"))
                       for r in measured),
            tokens=tuple(tokens) if isinstance(tokens, (list, tuple)) else (int(tokens),),
            repeats=d.get("repeats"), small=bool(d.get("small", False)),
            skipped=len(rows) - len(measured))


def read_table4(folder: Path) -> Table4Result | None:
    """The Table 4 measured on this machine's kind of CPU, else one of another kind (its ``kind`` says which);
    a full-width run before a smoke test; None (logged) when no file in ``folder`` is readable."""
    here = cpu_kind()
    paths = sorted(folder.glob("table4-*.json"), key=lambda p: (p.stem != f"table4-{here}", p.stem.endswith("-small")))
    for path in paths:
        try:
            return Table4Result.from_dict(json.loads(path.read_text()),
                                          kind=path.stem.removeprefix("table4-").removesuffix("-small"))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("cannot read %s", path, exc_info=True)
    return None
