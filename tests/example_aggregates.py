"""Aggregates a user writes, as the tests install them: the README's example.

``WeightedMean`` is installed as an entry point (see ``installed_aggregates`` in
``tests/test_quantiles.py``) and named by a YAML report; ``GeometricMean`` is passed from
Python. Both keep exact states (Fractions), so their results are the same for every
chunk size, as ashstream promises.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pyarrow as pa

from ashstream import Aggregate


class WeightedMean(Aggregate):
    """The mean of ``fields[0]`` weighted by ``fields[1]``, over rows where both are set."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = Fraction(scale)

    def init(self) -> tuple[Fraction, Fraction]:
        return (Fraction(0), Fraction(0))  # sum of value * weight, sum of weights

    def update(self, state: tuple, values: pa.StructArray) -> tuple:
        total, weights = state
        value_column, weight_column = values.field(0), values.field(1)
        for x, w in zip(value_column.to_pylist(), weight_column.to_pylist(), strict=True):
            if x is not None and w is not None:
                total += Fraction(x) * Fraction(w)
                weights += Fraction(w)
        return (total, weights)

    def merge(self, left: tuple, right: tuple) -> tuple:
        return (left[0] + right[0], left[1] + right[1])

    def finalize(self, state: tuple) -> float | None:
        total, weights = state
        return float(total / weights * self.scale) if weights else None

    def check(self, field_type: pa.DataType) -> str | None:
        numbers = all(
            pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in field_type
        )
        if field_type.num_fields != 2 or not numbers:
            return "needs two number fields: the value and its weight"
        return None


class GeometricMean(Aggregate):
    """The geometric mean of the positive values: the logs are summed as exact rationals,
    so the result does not depend on where the batches were cut."""

    def init(self) -> tuple[int, Fraction]:
        return (0, Fraction(0))

    def update(self, state: tuple, values: pa.Array) -> tuple:
        count, logs = state
        for x in values.to_pylist():
            if x is not None and x > 0:
                count += 1
                logs += Fraction(math.log(x))
        return (count, logs)

    def merge(self, left: tuple, right: tuple) -> tuple:
        return (left[0] + right[0], left[1] + right[1])

    def finalize(self, state: tuple) -> float | None:
        count, logs = state
        return math.exp(logs / count) if count else None


class Collected(Aggregate):
    """Every non-null value, in row order: a state merged in place, and the right one
    returned as it is when the left is empty, as the protocol allows."""

    def init(self) -> list:
        return []

    def update(self, state: list, values: pa.Array) -> list:
        return state + [v for v in values.to_pylist() if v is not None]

    def merge(self, left: list, right: list) -> list:
        if not left:
            return right
        left.extend(right)
        return left

    def finalize(self, state: list) -> list:
        return list(state)
