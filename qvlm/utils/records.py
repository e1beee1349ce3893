"""What every typed run record shares: it is saved as JSON and read back from files older code wrote."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, TypeVar

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """A mixin for frozen dataclasses: ``to_dict`` writes the field names as JSON keys; ``from_dict`` reads them
    back and leaves a key the file lacks at its field's default (a file written before the field existed)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # type: ignore[arg-type]
