"""``top`` and ``mode``: the most frequent values of a group, exact.

A group's state is a dict of each non-null value's count (count_distinct's memory: one
entry per distinct value of the open group). Each batch counts per group with Arrow's
hash aggregation; the parent adds the counts. Values compare as GROUP BY does: every
NaN is one value, and ``-0.0`` is ``0.0``. Ties in the count go to the lower value
(NaN above every number, as DuckDB orders it), so the result never depends on the order
the rows came in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from ashstream.analysis.functions import nested, plain, valid_mask
from ashstream.analysis.protocol import BatchAggregate

__all__ = ["Mode", "Top"]

_ENTRY_BYTES = 120  # a dict entry with a small key and its count


class _NaN:
    """The one key every NaN counts under: NaN != NaN, so NaNs would not meet in a dict
    (not even after pickling, which makes each a new object)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NaN)

    def __hash__(self) -> int:
        return 0x7FF8


def _key(value: Any) -> Any:
    if isinstance(value, float):
        if value != value:
            return _NaN()
        return value + 0.0  # -0.0 becomes 0.0
    return value


def _order(value: Any) -> tuple:
    return (1, 0) if isinstance(value, _NaN) else (0, value)


class Top(BatchAggregate):
    """The ``n`` most frequent non-null values with their counts."""

    def __init__(self, n: int) -> None:
        self.n = n

    def init(self) -> dict:
        return {}

    def check(self, field_type: pa.DataType) -> str | None:
        if nested(field_type):
            return f"counts single values, and this is {field_type}"
        return None

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        values = plain(values)
        valid = valid_mask(values)
        table = pa.table({"id": pa.array(ids, pa.int64()), "v": values})
        if not valid.all():
            table = table.filter(pa.array(valid))
        counted = table.group_by(["id", "v"], use_threads=False).aggregate([([], "count_all")])
        out: list[dict] = [{} for _ in range(n)]
        for i, value, count in zip(
            counted.column("id").to_pylist(),
            counted.column("v").to_pylist(),
            counted.column("count_all").to_pylist(),
            strict=True,
        ):
            counts = out[i]
            key = _key(value)
            counts[key] = counts.get(key, 0) + count  # NaNs of other payloads, 0.0, -0.0
        return out

    def merge(self, left: dict, right: dict) -> dict:
        """Adds ``right``'s counts into ``left``, in place (the parent owns ``left``)."""
        for key, count in right.items():
            left[key] = left.get(key, 0) + count
        return left

    def held_bytes(self, state: dict) -> int:
        return _ENTRY_BYTES * len(state)

    def finalize(self, state: dict) -> list[dict]:
        ranked = sorted(state.items(), key=lambda item: (-item[1], _order(item[0])))
        return [
            {"value": math.nan if isinstance(v, _NaN) else v, "count": c}
            for v, c in ranked[: self.n]
        ]


class Mode(Top):
    """The most frequent non-null value (the lowest of those tied); None for no values."""

    def __init__(self) -> None:
        super().__init__(1)

    def finalize(self, state: dict) -> Any:
        top = super().finalize(state)
        return top[0]["value"] if top else None
