"""Medians and quantiles, exact or sketched, the same for every chunking.

``method: exact`` keeps a group's valid values as numbers (floats as float64, integers
as int64 or uint64, decimals as unscaled integers, dates as days, timestamps as ticks),
in runs per group, unsorted. Past :data:`RUNS_KEPT` runs the parent joins the newest
two while the older is at most twice the newer (so about ``RUNS_KEPT + log2`` of the
batches runs, each value copied ``log2`` times; a group of up to ``RUNS_KEPT`` batches
or cached units is copied once, at the end). At the end it selects the values at the
quantiles' ranks (``np.partition``, linear: a sort of a month's 3M values took the
parent 0.2-0.3 s). Equal values are equal bits (``-0.0`` becomes ``0.0``, every NaN
one NaN), so the value at a rank cannot depend on the batch bounds. The result is
DuckDB's:

- ``quantile_disc``: the value at index ``max(1, n - floor(n - q*n)) - 1`` of the
  sorted values (DuckDB's own float expression, which differs from ``ceil(q*n)`` on
  rare rounding edges);
- ``quantile_cont``: position ``(n - 1) * q``, interpolated between its neighbours in
  float64 as ``lo * (1 - d) + hi * d``, the last multiply-add fused as in DuckDB's build
  (:func:`interpolate_between`).

NaN sorts above every number, as in DuckDB. Memory: 8 bytes per value of the open
group (about 40 for decimals beyond 18 digits); the collector stops a run whose open
groups hold more than half the memory limit and says to use the sketch.

``method: sketch`` is DDSketch's: a value ``x`` goes to bucket ``ceil(log|x| / log γ)``
with ``γ = (1 + α) / (1 - α)``; a bucket stands for ``2 γ**i / (γ + 1)``, within ``α``
of every value in it. A state is its buckets' counts, so merging adds counts: the same
in any order or partition. To bound memory, each sign keeps the ``2**64``-wide range
below its largest magnitude (``ceil(64 ln 2 / ln γ)`` buckets: 2,219 at α = 1 %);
smaller magnitudes join the lowest bucket kept. Which buckets collapse depends only on
the largest magnitude of all the rows, so the sketch too is independent of the
partitioning. The quantile is the bucket holding quantile_disc's rank, so the result is
within ``α`` of DuckDB's ``quantile_disc`` (for values in that range), at most 16 bytes
a bucket: 71 KiB a group at α = 1 %.
"""

from __future__ import annotations

import decimal
import math
import sys
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ashstream.analysis.functions import WIDE, is_numeric, is_temporal, plain, unscaled, valid_mask
from ashstream.analysis.protocol import BatchAggregate, id_spans

__all__ = ["ExactQuantile", "QuantileSketch", "disc_index"]

_OBJECT_BYTES = 40  # a Python int in an object array: pointer and object
RUNS_KEPT = 32  # a group's runs before they are joined (each join copies fresh memory)


def disc_index(n: int, q: float) -> int:
    """The index of quantile_disc(q) among ``n`` sorted values, as DuckDB computes it."""
    return max(1, n - math.floor(n - q * n)) - 1


def _quantiles(q: float | tuple[float, ...]) -> tuple[tuple[float, ...], bool]:
    return (q, True) if isinstance(q, tuple) else ((q,), False)


def as_numbers(array: pa.Array, valid: np.ndarray) -> np.ndarray:
    """The valid values of ``array`` as numbers that sort as the values do."""
    t = array.type
    if pa.types.is_decimal(t):
        return unscaled(array)[valid]
    values = array.filter(pa.array(valid)) if not valid.all() else array
    if pa.types.is_floating(t):
        x = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        # Equal values must be equal bits: a chart's buckets merge out of row order, and
        # -0.0 against 0.0 (or two NaN payloads) at the quantile's rank would then
        # depend on the batch bounds. DuckDB's own choice between the zeros is arbitrary.
        return np.where(x == 0, 0.0, np.where(np.isnan(x), np.nan, x))
    if pa.types.is_date(t):
        return (
            values.cast(pa.date32())
            .cast(pa.int32())
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
    if pa.types.is_timestamp(t):
        return values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    if t == pa.uint64():
        return values.to_numpy(zero_copy_only=False)
    return values.cast(pa.int64()).to_numpy(zero_copy_only=False)


def from_number(t: pa.DataType, number: Any) -> Any:
    """The value of type ``t`` that :func:`as_numbers` gave ``number`` for."""
    if pa.types.is_floating(t):
        return float(number)
    if pa.types.is_decimal(t):
        return decimal.Decimal(int(number)).scaleb(-t.scale, WIDE)
    if pa.types.is_date(t):
        return pa.array([int(number)], pa.int32()).cast(pa.date32())[0].as_py()
    if pa.types.is_timestamp(t):
        return pa.array([int(number)], pa.int64()).cast(t).to_pylist()[0]
    return int(number)


def _split_by_id(values: np.ndarray, ids: np.ndarray, n: int) -> list[np.ndarray]:
    """Per id 0..n-1, its values (its own: not a view that holds a batch's buffer)."""
    if n == 1:
        return [values if values.base is None else values.copy()]
    ordered = values[np.argsort(ids, kind="stable")]
    return [ordered[a:b] for a, b in id_spans(ids, n)]


class ExactQuantile(BatchAggregate):
    """``median`` and ``quantile`` with ``method: exact``; see the module's docstring."""

    def __init__(self, q: float | tuple[float, ...], interpolate: bool | None = None) -> None:
        self.qs, self.listed = _quantiles(q)
        self.interpolate = interpolate

    def init(self) -> tuple:
        return (None, ())

    def check(self, field_type: pa.DataType) -> str | None:
        if not (is_numeric(field_type) or is_temporal(field_type)):
            return f"needs a number, date or timestamp, and this is {field_type}"
        numbers = pa.types.is_integer(field_type) or pa.types.is_floating(field_type)
        if self.interpolate and not numbers:
            return (
                f"interpolate: true needs integers or floats, and this is {field_type}; "
                "drop it to take the value at the quantile's rank"
            )
        return None

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        values = plain(values)
        valid = valid_mask(values)
        numbers = as_numbers(values, valid)
        if not len(numbers):
            return [(values.type, ())] * n
        runs = _split_by_id(numbers, ids[valid], n)
        return [(values.type, (run,) if len(run) else ()) for run in runs]

    def merge(self, left: tuple, right: tuple) -> tuple:
        kind = left[0] if left[0] is not None else right[0]
        if not right[1]:
            return (kind, left[1])
        runs = [*left[1], *right[1]]
        while len(runs) > RUNS_KEPT and len(runs[-2]) <= 2 * len(runs[-1]):
            newer = runs.pop()
            runs.append(np.concatenate([runs.pop(), newer]))
        return (kind, tuple(runs))

    def held_bytes(self, state: tuple) -> int:
        return sum(r.nbytes * (_OBJECT_BYTES // 8 if r.dtype == object else 1) for r in state[1])

    def finalize(self, state: tuple) -> Any:
        kind, runs = state
        if not runs:
            return None
        values = np.concatenate(runs) if len(runs) > 1 else runs[0].copy()  # to reorder
        interpolate = self.interpolate
        if interpolate is None:
            interpolate = pa.types.is_floating(kind)
        n = len(values)
        if interpolate:
            positions = [(n - 1) * q for q in self.qs]
            around = {r for p in positions for r in (math.floor(p), math.ceil(p))}
            values.partition(sorted(around))  # each rank's value at its place
            found = [_interpolated(values, p) for p in positions]
        else:
            ranks = [disc_index(n, q) for q in self.qs]
            values.partition(sorted(set(ranks)))
            found = [from_number(kind, values[r]) for r in ranks]
        return found if self.listed else found[0]


def _interpolated(ranked: np.ndarray, position: float) -> float:
    """quantile_cont at ``position`` of values whose ranks around it are in place."""
    lo, hi = math.floor(position), math.ceil(position)
    low = float(ranked[lo])
    if lo == hi:
        return low
    return interpolate_between(low, float(ranked[hi]), position - lo)


def interpolate_between(low: float, high: float, d: float) -> float:
    """``low * (1 - d) + high * d`` as DuckDB's build computes it: the compiler fuses the
    last multiply and add (one rounding), which plain float arithmetic would not match in
    the last digit a third of the time."""
    high_part = high * d
    if not (math.isfinite(low) and math.isfinite(high_part)):
        return low * (1 - d) + high_part
    return float(Fraction(low) * Fraction(1 - d) + Fraction(high_part))


# ------------------------------------------------------------------------ sketch

_OFFSET = 1 << 40  # positive bucket i is key _OFFSET + i; negative, -(_OFFSET + i)
_INF = 2 << 40
_NAN = 3 << 40  # above +inf: NaN is the largest value, as in DuckDB


class QuantileSketch(BatchAggregate):
    """``median`` and ``quantile`` with ``method: sketch``; see the module's docstring."""

    def __init__(self, q: float | tuple[float, ...], relative_error: float) -> None:
        self.qs, self.listed = _quantiles(q)
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self.log_gamma = math.log(self.gamma)
        self.buckets = math.ceil(64 * math.log(2) / self.log_gamma)  # per sign

    def init(self) -> tuple:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty)

    def check(self, field_type: pa.DataType) -> str | None:
        numbers = (
            pa.types.is_integer(field_type)
            or pa.types.is_floating(field_type)
            or pa.types.is_decimal(field_type)
        )
        if not numbers:
            return (
                f"method: sketch needs numbers, and this is {field_type}; "
                "use method: exact for dates and timestamps"
            )
        return None

    def keys(self, x: np.ndarray) -> np.ndarray:
        """Each float's bucket key; keys sort as the values do."""
        keys = np.zeros(len(x), dtype=np.int64)
        magnitude = np.abs(x)
        regular = np.isfinite(x) & (magnitude > 0)
        with np.errstate(divide="ignore"):
            index = np.ceil(np.log(magnitude[regular]) / self.log_gamma).astype(np.int64)
        keys[regular] = np.where(x[regular] > 0, _OFFSET + index, -(_OFFSET + index))
        keys[x == np.inf] = _INF
        keys[x == -np.inf] = -_INF
        keys[np.isnan(x)] = _NAN
        return keys

    def _collapse(self, keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct keys with their counts, each sign's small magnitudes folded
        into its lowest kept bucket (see the module's docstring)."""
        positive = (keys > 0) & (keys < _INF)
        if positive.any():
            floor = int(keys[positive].max()) - self.buckets + 1
            keys = np.where(positive & (keys < floor), floor, keys)
        negative = (keys < 0) & (keys > -_INF)
        if negative.any():
            ceiling = int(keys[negative].min()) + self.buckets - 1
            keys = np.where(negative & (keys > ceiling), ceiling, keys)
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, np.bincount(inverse.reshape(-1), weights=counts).astype(np.int64)

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        values = plain(values)
        valid = valid_mask(values)
        x = pc.filter(values, pa.array(valid)) if not valid.all() else values
        keys = self.keys(x.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False))
        ids = ids[valid]
        if n < 1 << 20:  # one sort of (id, key) packed in an int64: keys are within ±2**42
            packed, counts = np.unique((ids << 43) + (keys + (1 << 42)), return_counts=True)
            ids, keys = packed >> 43, (packed & ((1 << 43) - 1)) - (1 << 42)
        else:
            order = np.lexsort((keys, ids))
            keys, ids = keys[order], ids[order]
            new = np.ones(len(keys), dtype=bool)
            new[1:] = (keys[1:] != keys[:-1]) | (ids[1:] != ids[:-1])
            starts = np.flatnonzero(new)
            counts = np.diff(np.append(starts, len(keys)))
            keys, ids = keys[starts], ids[starts]
        whole = self._spans_fit(keys)  # then no group's buckets collapse
        out = []
        for a, b in id_spans(ids, n):
            if b == a:
                out.append(self.init())
            else:
                state = (keys[a:b], counts[a:b])
                out.append(state if whole else self._collapse(*state))
        return out

    def _spans_fit(self, keys: np.ndarray) -> bool:
        """Whether each sign's buckets among ``keys`` span fewer than the kept number."""
        for sign in (keys[(keys > 0) & (keys < _INF)], keys[(keys < 0) & (keys > -_INF)]):
            if len(sign) and int(sign.max()) - int(sign.min()) >= self.buckets:
                return False
        return True

    def merge(self, left: tuple, right: tuple) -> tuple:
        if not len(right[0]):
            return left
        if not len(left[0]):
            return right
        keys = np.concatenate([left[0], right[0]])
        return self._collapse(keys, np.concatenate([left[1], right[1]]))

    def finalize(self, state: tuple) -> Any:
        keys, counts = state
        total = int(counts.sum())
        if not total:
            return None
        cumulative = np.cumsum(counts)
        found = []
        for q in self.qs:
            bucket = int(np.searchsorted(cumulative, disc_index(total, q), side="right"))
            found.append(self.value(int(keys[bucket])))
        return found if self.listed else found[0]

    def value(self, key: int) -> float:
        """The value a bucket stands for."""
        if key == 0:
            return 0.0
        if abs(key) == _INF:
            return math.copysign(math.inf, key)
        if key == _NAN:
            return math.nan
        index = abs(key) - _OFFSET
        try:
            estimate = 2 * math.exp(index * self.log_gamma) / (self.gamma + 1)
        except OverflowError:  # the bucket of the largest floats
            estimate = sys.float_info.max
        estimate = min(estimate, sys.float_info.max)
        return estimate if key > 0 else -estimate
