"""The aggregate functions: how each reduces a batch to per-group states, merges two
states in row order, and reports a result. Every merge is exact (see
:mod:`ashstream.analysis.aggregate` for why), so results do not depend on batch bounds.
Used by groups and variables (``aggregate``) and by charts (``charts``).
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ashstream.analysis.protocol import BatchAggregate

WIDE = decimal.Context(prec=200)  # decimal sums merge without rounding
_LIMB_BITS = 21
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_CLASS_BITS = 8  # exponent values per class: mantissa << 7 still fits int64
_SET_ENTRY_BYTES = 100  # a set entry with a small value


# ------------------------------------------------------------------ exact sums


def magnitude(values: np.ndarray) -> int:
    """The largest absolute value of an integer array, as a Python int (np.abs would
    overflow on int64's minimum)."""
    return max(abs(int(values.min())), abs(int(values.max()))) if len(values) else 0


def _limb_sums(values: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Exact sums of int64 ``values`` per id, as an object array of Python ints.

    Each value is split into three 21-bit limbs (arithmetic shifts keep the sign in the
    top limb); float64 bincount sums them exactly below 2**52, i.e. for 2**31 rows.
    Small values need no limbs: their sums stay below 2**53 as they are."""
    if magnitude(values) * len(values) < 2**53:
        sums = np.bincount(ids, weights=values.astype(np.float64), minlength=n)
        return sums.astype(np.int64).astype(object)
    totals = np.zeros(n, dtype=object)
    for shift in (0, _LIMB_BITS, 2 * _LIMB_BITS):
        limb = values >> shift if shift == 2 * _LIMB_BITS else (values >> shift) & _LIMB_MASK
        sums = np.bincount(ids, weights=limb.astype(np.float64), minlength=n)
        totals = totals + sums.astype(np.int64).astype(object) * (1 << shift)
    return totals


def int_sums(values: np.ndarray, ids: np.ndarray, n: int) -> list[int]:
    if values.dtype == np.uint64:
        high = _limb_sums((values >> np.uint64(32)).astype(np.int64), ids, n)
        low = _limb_sums((values & np.uint64(0xFFFFFFFF)).astype(np.int64), ids, n)
        return list(high * (1 << 32) + low)
    return list(_limb_sums(values.astype(np.int64), ids, n))


def float_sums(values: np.ndarray, ids: np.ndarray, n: int) -> list[Fraction | float]:
    """Exact sums of float64 values per id: Fractions, or a float when inf or nan is in."""
    out: list[Fraction | float] = [Fraction(0)] * n
    finite = np.isfinite(values)
    if not finite.all():
        for i in np.unique(ids[~finite]):
            out[i] = math.fsum(values[(ids == i) & ~finite])  # inf, -inf or nan
        values, ids = values[finite], ids[finite]
    if not len(values):
        return out
    mantissa, exponent = np.frexp(values)
    ints = (mantissa * 2.0**53).astype(np.int64)  # exact: |mantissa| < 1
    exponent = exponent.astype(np.int64) - 53
    lowest = int(exponent.min())
    relative = exponent - lowest
    classes = relative >> 3
    n_classes = int(classes.max()) + 1
    sums = _limb_sums(ints << (relative & 7), ids * n_classes + classes, n * n_classes)
    scale = np.array([1 << (_CLASS_BITS * c) for c in range(n_classes)], dtype=object)
    totals = (sums.reshape(n, n_classes) * scale).sum(axis=1)
    unit = Fraction(2) ** lowest
    for i, total in enumerate(totals):
        if isinstance(out[i], Fraction):
            out[i] = total * unit
    return out


def _split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Veltkamp's split: ``x == hi + lo`` with 26-bit halves, so hi*hi, hi*lo and lo*lo
    are exact in float64 and x*x can be summed exactly."""
    with np.errstate(over="ignore", invalid="ignore"):
        c = values * 134217729.0
        hi = c - (c - values)
    return hi, values - hi


# ------------------------------------------------------------------- functions


def is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_date(t) or pa.types.is_timestamp(t)


def plain(array: pa.Array) -> pa.Array:
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def valid_mask(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return np.asarray(array.is_valid())


def _grouped(array: pa.Array, ids: np.ndarray, n: int, aggregation: str) -> list:
    """Arrow's hash aggregation per id 0..n-1 (ids need not be contiguous)."""
    table = pa.table({"id": pa.array(ids, pa.int64()), "v": array})
    result = table.group_by("id", use_threads=False).aggregate([("v", aggregation)])
    out: list = [None] * n
    for i, value in zip(
        result.column("id").to_pylist(), result.column(f"v_{aggregation}").to_pylist(), strict=True
    ):
        out[i] = value
    return out


def _pick(array: pa.Array, ids: np.ndarray, n: int, last: bool) -> list:
    """The first (or last) non-null value per id, in row order; for every type."""
    rows = np.flatnonzero(valid_mask(array))
    if last:
        rows = rows[::-1]
    found, where = np.unique(ids[rows], return_index=True)
    out: list = [None] * n
    values = array.take(pa.array(rows[where])).to_pylist()
    for i, value in zip(found.tolist(), values, strict=True):
        out[i] = value
    return out


def unscaled(array: pa.Array) -> np.ndarray:
    """A decimal array's unscaled values: int64 (views of the low words) for precision
    up to 18, else Python ints."""
    t = array.type
    if t.precision <= 18 and isinstance(t, pa.Decimal128Type):
        words = np.frombuffer(array.buffers()[1], dtype=np.int64)
        return words[2 * array.offset : 2 * (array.offset + len(array)) : 2].copy()
    return np.array(
        [0 if d is None else int(d.scaleb(t.scale, WIDE)) for d in array.to_pylist()], dtype=object
    )


def nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or pa.types.is_union(t)


def _hashable(array: pa.Array) -> pa.Array:
    """Lists, structs and maps as their Typst literals, which Arrow can hash: equal
    values have equal literals."""
    if not nested(array.type):
        return array
    from ashstream.encode import encode_array

    return pc.if_else(array.is_valid(), encode_array(array), pa.scalar(None, pa.string()))


def _sum_state(array: pa.Array, ids: np.ndarray, n: int) -> list[tuple[int, Any]]:
    """(non-null count, exact sum) per id."""
    valid = valid_mask(array)
    counts = np.bincount(ids[valid], minlength=n)
    t = array.type
    if pa.types.is_decimal(t) and t.precision <= 18 and isinstance(t, pa.Decimal128Type):
        totals = int_sums(unscaled(array)[valid], ids[valid], n)
        sums = [decimal.Decimal(s).scaleb(-t.scale, WIDE) for s in totals]
    elif pa.types.is_decimal(t):
        sums = _grouped(array, ids, n, "sum")
        sums = [s if s is not None else decimal.Decimal(0) for s in sums]
    else:
        values = array.to_numpy(zero_copy_only=False) if array.null_count == 0 else None
        if values is None:
            values = pc.drop_null(array).to_numpy(zero_copy_only=False)
        if pa.types.is_floating(t):
            sums = float_sums(values.astype(np.float64), ids[valid], n)
        else:
            sums = int_sums(values, ids[valid], n)
    return list(zip(counts.tolist(), sums, strict=True))


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, decimal.Decimal) or isinstance(b, decimal.Decimal):
        return WIDE.add(a, b)  # 0 + Decimal would round to 28 digits
    return a + b


def _moments(array: pa.Array, ids: np.ndarray, n: int) -> list[tuple[int, Any, Any]]:
    """(n, exact sum of x, exact sum of x*x) per id, over the values as float64 (as
    DuckDB computes variance)."""
    valid = valid_mask(array)
    x = pc.drop_null(array).cast(pa.float64()).to_numpy(zero_copy_only=False)
    ids = ids[valid]
    counts = np.bincount(ids, minlength=n)
    hi, lo = _split(x)
    s1 = float_sums(x, ids, n)
    parts = [float_sums(p, ids, n) for p in (hi * hi, 2 * hi * lo, lo * lo)]
    s2 = [a + b + c for a, b, c in zip(*parts, strict=True)]
    return list(zip(counts.tolist(), s1, s2, strict=True))


def _add_moments(a: tuple, b: tuple) -> tuple:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _variance(state: tuple[int, Any, Any]) -> float | None:
    count, s1, s2 = state
    if count < 2:
        return None
    if isinstance(s1, float) or isinstance(s2, float):  # inf or nan among the values
        return math.nan
    return float((s2 - s1 * s1 / count) / (count - 1))


def _average(state: tuple[int, Any]) -> float | None:
    count, total = state
    if count == 0:
        return None
    if isinstance(total, float):
        return total / count
    return float(Fraction(total) / count)


def _first(a: Any, b: Any) -> Any:
    return a if a is not None else b


def _last(a: Any, b: Any) -> Any:
    return b if b is not None else a


def _min(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


def _max(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else max(a, b)


class Function(BatchAggregate):
    """A built-in function given by its parts: how it reduces a batch to per-group
    states, merges two states (left before right in row order, without changing either:
    a chart's rollup shares states) and gives the result."""

    def __init__(
        self,
        reduce: Callable[[pa.Array, np.ndarray, int], list],
        merge: Callable[[Any, Any], Any],
        finalize: Callable[[Any], Any],
        empty: Any,
        held: Callable[[Any], int] | None = None,
    ) -> None:
        self._reduce, self._merge, self._finalize = reduce, merge, finalize
        self.empty = empty  # the state of no rows, immutable
        self._held = held  # state -> bytes, for a state that grows with the rows

    def init(self) -> Any:
        return self.empty

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        return self._reduce(values, ids, n)

    def merge(self, left: Any, right: Any) -> Any:
        return self._merge(left, right)

    def finalize(self, state: Any) -> Any:
        return self._finalize(state)

    def held_bytes(self, state: Any) -> int:
        return 0 if self._held is None else self._held(state)


def _hash(aggregation: str):
    return lambda array, ids, n: _grouped(array, ids, n, aggregation)


FUNCTIONS: dict[str, Function] = {
    "count": Function(
        lambda a, ids, n: np.bincount(ids[valid_mask(a)], minlength=n).tolist(),
        lambda a, b: a + b,
        lambda s: s,
        0,
    ),
    "count_distinct": Function(
        lambda a, ids, n: [set(v or ()) for v in _grouped(_hashable(a), ids, n, "distinct")],
        lambda a, b: a | b,
        len,
        frozenset(),
        lambda s: _SET_ENTRY_BYTES * len(s),
    ),
    "sum": Function(
        _sum_state,
        lambda a, b: (a[0] + b[0], _add(a[1], b[1])),
        lambda s: None if s[0] == 0 else float(s[1]) if isinstance(s[1], Fraction) else s[1],
        (0, 0),
    ),
    "avg": Function(_sum_state, lambda a, b: (a[0] + b[0], _add(a[1], b[1])), _average, (0, 0)),
    "min": Function(_hash("min"), _min, lambda s: s, None),
    "max": Function(_hash("max"), _max, lambda s: s, None),
    "first": Function(lambda a, ids, n: _pick(a, ids, n, False), _first, lambda s: s, None),
    "last": Function(lambda a, ids, n: _pick(a, ids, n, True), _last, lambda s: s, None),
    "variance": Function(_moments, _add_moments, _variance, (0, 0, 0)),
    "stddev": Function(
        _moments,
        _add_moments,
        lambda s: None if (v := _variance(s)) is None else math.sqrt(v),
        (0, 0, 0),
    ),
}
