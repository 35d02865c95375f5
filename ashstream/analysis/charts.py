"""Charts: a million rows into a few hundred points, in parallel and in constant memory.

Aggregated charts (``agg`` sum, count, avg, min, max) reduce each batch to one state per
(series, bucket) with the variables' exact functions (:mod:`ashstream.analysis.aggregate`); the
collector merges them. A calendar bucket is computed at the finest unit (hour for
timestamps, day for dates) and rolled up in the collector, so ``bucket: auto`` can keep
every candidate unit and, at the end, pick the finest with at most ``points`` buckets.
Memory: one state per bucket with rows and series; with ``auto``, a candidate unit is
dropped as soon as it has more than ``points`` buckets (it can never come back under),
so at most ``points + 1`` buckets per unit (years are always kept). Only buckets with rows appear; rows whose x is null (or NaN) are left out.

A raw series (``agg: none``) is downsampled with MinMaxLTTB: x is cut into bins of
``2**level`` ticks (microseconds, days or integers); each bin keeps its lowest and highest
point (ties: the earlier row) and the series keeps its first and last point. Each batch
uses the finest level giving at most ``2 * points`` bins; the collector merges bins and
coarsens while there are more. Bins only merge exactly, so the final level is the finest
at which the whole series has at most ``2 * points`` bins, whatever the batches were: the
candidates, and so the LTTB result, are the same for every chunk size and worker count.
Memory: at most ``4 * points + 2`` candidate points per series.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ashstream.analysis.catalog import aggregate_of
from ashstream.analysis.functions import plain, valid_mask
from ashstream.report import Chart

__all__ = ["ChartCollector", "chart_partial", "lttb"]

EPOCH = dt.date(1970, 1, 1)
_UNITS_PER_SECOND = {"s": 1, "ms": 1000, "us": 10**6, "ns": 10**9}
CALENDAR = ("hour", "day", "week", "month", "quarter", "year")  # finest first


# ------------------------------------------------------------------ transformer side


def _ticks(x: pa.Array, timezone: str) -> tuple[np.ndarray, str]:
    """x as int64 ticks and their unit: ``us``-like for timestamps (in the display time
    zone's wall clock), ``day`` for dates, ``1`` for integers."""
    t = x.type
    if pa.types.is_timestamp(t):
        if t.tz is not None:
            x = pc.local_timestamp(x.cast(pa.timestamp(t.unit, tz=timezone)))
        return x.cast(pa.int64()).to_numpy(zero_copy_only=False), t.unit
    if pa.types.is_date(t):
        return x.cast(pa.date32()).cast(pa.int32()).to_numpy(zero_copy_only=False).astype(
            np.int64
        ), "day"
    return x.cast(pa.int64()).to_numpy(zero_copy_only=False), "1"


def _finest_keys(x: pa.Array, chart: Chart, timezone: str) -> tuple[np.ndarray, str]:
    """Each row's bucket at the finest unit the collector needs: hours or days since
    1970, or bin numbers for a numeric width."""
    if not isinstance(chart.bucket, str):
        values = x.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return np.floor(values / chart.bucket).astype(np.int64), "width"
    ticks, unit = _ticks(x, timezone)
    if unit == "day":
        return ticks, "day"
    per_hour = 3600 * _UNITS_PER_SECOND[unit]
    if chart.bucket in ("hour", "auto"):
        return np.floor_divide(ticks, per_hour), "hour"
    return np.floor_divide(ticks, 24 * per_hour), "day"


def _with_x(batch: pa.RecordBatch, x: str) -> pa.RecordBatch:
    """The rows whose x can be placed: not null, and not NaN or infinite."""
    column = plain(batch.column(x))
    mask = valid_mask(column)
    if pa.types.is_floating(column.type):
        mask &= np.isfinite(column.fill_null(0).to_numpy(zero_copy_only=False))
    return batch if mask.all() else batch.filter(pa.array(mask))


def chart_partial(batch: pa.RecordBatch, chart: Chart, first_row: int, timezone: str) -> Any:
    if chart.agg == "none":
        return _series_partial(batch, chart, first_row, timezone)
    batch = _with_x(batch, chart.x)
    if not batch.num_rows:
        return ("", {})
    keys, unit = _finest_keys(plain(batch.column(chart.x)), chart, timezone)
    series = _series_values(batch, chart)
    if series:
        pairs = np.stack([series[1], keys])
        unique, ids = np.unique(pairs, axis=1, return_inverse=True)
    else:
        unique, ids = _dense_ids(keys)
        unique = unique[None, :]
    ids = ids.reshape(-1).astype(np.int64)
    n = unique.shape[1]
    if chart.agg == "count" and chart.y is None:
        states = np.bincount(ids, minlength=n).tolist()
    else:
        states = aggregate_of(chart).reduce(plain(batch.column(chart.y)), ids, n)
    names = series[0] if series else [None]
    out = {}
    for j in range(n):
        name = names[unique[0, j]] if series else None
        out[(name, int(unique[-1, j]))] = states[j]
    return (unit, out)


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and each row's index into them; by counting when the keys are
    dense (days, hours), which is several times faster than sorting."""
    low = int(keys.min())
    span = int(keys.max()) - low + 1
    if span > 4 * len(keys) + 4096:
        return np.unique(keys, return_inverse=True)
    present = np.flatnonzero(np.bincount(keys - low, minlength=span))
    index = np.full(span, -1, dtype=np.int64)
    index[present] = np.arange(len(present))
    return present + low, index[keys - low]


def _series_values(batch: pa.RecordBatch, chart: Chart) -> tuple[list, np.ndarray] | None:
    """The series' distinct values and each row's index into them."""
    if chart.series is None:
        return None
    encoded = pc.dictionary_encode(plain(batch.column(chart.series)), null_encoding="encode")
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False)


@dataclass
class _Series:
    """A raw series reduced to its candidate points at bins of ``2**level`` ticks: each
    bin's lowest and highest point (ties: the earlier row) and the series' first and
    last, as columns in (tick, row) order. Two merge by pooling their points and
    reducing again: a bin's extremes are among its sub-bins' extremes. Never changed
    once made (a merge makes a new one), so partials may share them."""

    level: int
    tick: np.ndarray  # int64
    y: np.ndarray  # float64, finite
    row: np.ndarray  # int64, distinct
    x_values: pa.Array  # the x and y column values, for the chart's points
    y_values: pa.Array

    def merge(self, other: _Series, max_bins: int) -> _Series:
        """The points of both, at the finest level from both levels up with at most
        ``max_bins`` bins."""
        tick = np.concatenate([self.tick, other.tick])
        level = _level_for(tick, max_bins, max(self.level, other.level))
        return _reduced(
            level,
            tick,
            np.concatenate([self.y, other.y]),
            np.concatenate([self.row, other.row]),
            pa.concat_arrays([self.x_values, other.x_values]),
            pa.concat_arrays([self.y_values, other.y_values]),
        )


def _reduced(level, tick, y, row, x_values: pa.Array, y_values: pa.Array) -> _Series:
    """The candidate points of these points at ``level``."""
    bins = tick >> level

    def firsts(order: np.ndarray) -> np.ndarray:
        sorted_bins = bins[order]
        starts = np.flatnonzero(np.diff(sorted_bins, prepend=sorted_bins[0] - 1))
        return order[starts]

    lows = firsts(np.lexsort((row, y, bins)))
    highs = firsts(np.lexsort((row, -y, bins)))
    by_place = np.lexsort((row, tick))
    keep = np.unique(np.concatenate([lows, highs, by_place[[0, -1]]]))
    keep = keep[np.lexsort((row[keep], tick[keep]))]
    index = pa.array(keep, pa.int64())
    return _Series(
        level, tick[keep], y[keep], row[keep], x_values.take(index), y_values.take(index)
    )


def _series_partial(batch: pa.RecordBatch, chart: Chart, first_row: int, timezone: str) -> dict:
    rows = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
    mask = valid_mask(batch.column(chart.x)) & valid_mask(batch.column(chart.y))
    y_all = pc.cast(plain(batch.column(chart.y)), pa.float64()).fill_null(np.nan)
    mask &= np.isfinite(y_all.to_numpy(zero_copy_only=False))
    batch, rows = batch.filter(pa.array(mask)), rows[mask]
    if not batch.num_rows:
        return {}
    x = plain(batch.column(chart.x))
    ticks, _ = _ticks(x, timezone)
    y = pc.cast(plain(batch.column(chart.y)), pa.float64()).to_numpy(zero_copy_only=False)
    series = _series_values(batch, chart)
    out = {}
    groups = [(None, np.arange(batch.num_rows))]
    if series:
        groups = [(name, np.flatnonzero(series[1] == i)) for i, name in enumerate(series[0])]
    for name, idx in groups:
        if len(idx):
            ticks_of = ticks[idx]
            out[name] = _reduced(
                _level_for(ticks_of, 2 * chart.points),
                ticks_of,
                y[idx],
                rows[idx],
                x.take(idx),
                plain(batch.column(chart.y)).take(idx),
            )
    return out


def _level_for(ticks: np.ndarray, max_bins: int, lowest: int = 0) -> int:
    """The finest level from ``lowest`` up at which ``ticks`` fall into at most
    ``max_bins`` bins."""
    unique = np.unique(ticks)
    lo, hi = lowest, max(lowest, 64)
    while lo < hi:
        mid = (lo + hi) // 2
        if 1 + np.count_nonzero(np.diff(unique >> mid)) <= max_bins:
            hi = mid
        else:
            lo = mid + 1
    return lo


# --------------------------------------------------------------------- parent side


def join_chart_partials(chart: Chart, left: Any, right: Any) -> Any:
    """A chart's partial of ``left``'s rows and ``right``'s, taking ``right``'s states
    (see :func:`~ashstream.analysis.aggregate.join_partials`)."""
    if chart.agg == "none":
        for name, points in right.items():
            held = left.get(name)
            left[name] = points if held is None else held.merge(points, 2 * chart.points)
        return left
    if not right[1]:
        return left
    if not left[1]:
        return right
    function, states = aggregate_of(chart), left[1]
    for slot, state in right[1].items():
        states[slot] = function.merge(states[slot], state) if slot in states else state
    return left


def lttb(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Largest-Triangle-Three-Buckets (Steinarsson 2013): indices of ``n_out`` points of
    the series (sorted by x) that keep its visual shape; the first and last are kept."""
    n = len(x)
    if n_out >= n or n_out < 3:
        return np.arange(n)
    every = (n - 2) / (n_out - 2)
    chosen = [0]
    a = 0
    for i in range(n_out - 2):
        start = int(np.floor(i * every)) + 1
        end = int(np.floor((i + 1) * every)) + 1
        next_end = min(int(np.floor((i + 2) * every)) + 1, n)
        avg_x, avg_y = x[end:next_end].mean(), y[end:next_end].mean()
        area = np.abs(
            (x[a] - avg_x) * (y[start:end] - y[a]) - (x[a] - x[start:end]) * (avg_y - y[a])
        )
        a = start + int(np.argmax(area))
        chosen.append(a)
    chosen.append(n - 1)
    return np.array(chosen, dtype=np.int64)


def _unit_key(unit: str, day: int) -> int:
    """Roll a day number up to a week, month, quarter or year number."""
    if unit == "day":
        return day
    if unit == "week":
        return (day + 3) // 7  # 1970-01-01 was a Thursday; weeks start on Monday
    date = EPOCH + dt.timedelta(days=day)
    if unit == "month":
        return date.year * 12 + date.month - 1
    if unit == "quarter":
        return date.year * 4 + (date.month - 1) // 3
    return date.year


def _bucket_start(unit: str, key: int) -> Any:
    if unit == "hour":
        return dt.datetime(1970, 1, 1) + dt.timedelta(hours=key)
    if unit == "day":
        return EPOCH + dt.timedelta(days=key)
    if unit == "week":
        return EPOCH + dt.timedelta(days=key * 7 - 3)
    if unit == "month":
        return dt.date(key // 12, key % 12 + 1, 1)
    if unit == "quarter":
        return dt.date(key // 4, (key % 4) * 3 + 1, 1)
    return dt.date(key, 1, 1)


class ChartCollector:
    """Merges a chart's batch partials in the parent; :meth:`result` gives its points."""

    def __init__(self, chart: Chart) -> None:
        self.chart = chart
        self.function = aggregate_of(chart) if chart.agg != "none" else None
        self.units: dict[str, dict] | None = None  # aggregated: unit -> {(series, key): state}
        self.series: dict[Any, _Series] = {}  # raw series: series -> candidate points

    def add(self, partial: Any) -> None:
        if self.chart.agg == "none":
            self.series = join_chart_partials(self.chart, self.series, partial)
            return
        finest, states = partial
        if not states:
            return
        if self.units is None:
            self.units = {unit: {} for unit in self._candidates(finest)}
        # The units share states: a chart's functions never change a state they merge.
        for unit, buckets in list(self.units.items()):
            for (name, key), state in states.items():
                if unit == "hour" or unit == finest:
                    rolled = key
                else:
                    rolled = _unit_key(unit, key // 24 if finest == "hour" else key)
                slot = (name, rolled)
                buckets[slot] = (
                    self.function.merge(buckets[slot], state) if slot in buckets else state
                )
            if self.chart.bucket == "auto" and len(buckets) > self.chart.points and unit != "year":
                del self.units[unit]  # more buckets than points: never again fewer

    def held_bytes(self) -> int:
        """What the buckets' states hold that grows with the rows."""
        if self.function is None or not self.units:
            return 0
        states = {id(s): s for buckets in self.units.values() for s in buckets.values()}
        return sum(self.function.held_bytes(s) for s in states.values())  # units share some

    def _candidates(self, finest: str) -> list[str]:
        bucket = self.chart.bucket
        if finest == "width":
            return ["width"]
        if bucket != "auto":
            return [bucket]
        return list(CALENDAR[CALENDAR.index(finest) :])

    def result(self) -> dict[str, Any]:
        chart = self.chart
        out: dict[str, Any] = {"x": chart.x, "y": chart.y, "agg": chart.agg}
        if chart.agg == "none":
            out["unit"] = None
            series = {name: self._downsample(bins) for name, bins in self.series.items()}
        else:
            unit, buckets = self._chosen()
            out["unit"] = unit if unit != "width" else chart.bucket
            series: dict[Any, list] = {}
            for (name, key), state in sorted(
                buckets.items(), key=lambda item: (_order(item[0][0]), item[0][1])
            ):
                x = key * chart.bucket if unit == "width" else _bucket_start(unit, key)
                series.setdefault(name, []).append({"x": x, "y": self.function.finalize(state)})
        ordered = sorted(series.items(), key=lambda item: _order(item[0]))
        out["series"] = [{"key": name, "points": points} for name, points in ordered]
        out["points"] = ordered[0][1] if chart.series is None and ordered else []
        return out

    def _chosen(self) -> tuple[str, dict]:
        if not self.units:
            unit = (
                "width"
                if not isinstance(self.chart.bucket, str)
                else (self.chart.bucket if self.chart.bucket != "auto" else "day")
            )
            return unit, {}
        unit = next(iter(self.units))  # the finest left
        return unit, self.units[unit]

    def _downsample(self, points: _Series) -> list[dict]:
        keep = pa.array(lttb(points.tick.astype(np.float64), points.y, self.chart.points))
        xs = points.x_values.take(keep).to_pylist()
        ys = points.y_values.take(keep).to_pylist()
        return [{"x": x, "y": y} for x, y in zip(xs, ys, strict=True)]


def _order(value: Any) -> tuple:
    """Series values sort with None last and mixed types apart."""
    return (value is None, type(value).__name__, value if value is not None else 0)
