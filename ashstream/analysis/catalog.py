"""Which :class:`~ashstream.analysis.protocol.Aggregate` computes a variable or a chart's
points, and the per-variable states of a batch or a group built from them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ashstream.analysis.frequent import Mode, Top
from ashstream.analysis.functions import FUNCTIONS, plain
from ashstream.analysis.protocol import Aggregate
from ashstream.analysis.quantiles import ExactQuantile, QuantileSketch
from ashstream.report import AggregateOptions, Chart, Variable

__all__ = [
    "aggregate_of",
    "empty_states",
    "merge_states",
    "reduce_states",
    "results",
    "values_of",
]


def aggregate_of(spec: Variable | Chart) -> Aggregate:
    """The aggregate of a variable, or of a chart's points (made once per process)."""
    if isinstance(spec, Chart):
        return _aggregate("count" if spec.y is None else spec.agg, spec.options, None)
    return _aggregate(spec.function, spec.options, spec.factory)


@functools.cache
def _aggregate(name: str, options: AggregateOptions, factory: Any) -> Aggregate:
    if factory is not None:
        return factory(**dict(options.custom))
    if name in ("median", "quantile"):
        if options.method == "sketch":
            return QuantileSketch(options.q, options.relative_error)
        return ExactQuantile(options.q, options.interpolate)
    if name == "top":
        return Top(options.n)
    if name == "mode":
        return Mode()
    return FUNCTIONS[name]


def values_of(batch: pa.RecordBatch, v: Variable) -> pa.Array:
    """What ``v`` aggregates: its field's values, or a struct of its fields' per row."""
    if v.fields:
        columns = [plain(batch.column(name)) for name in v.fields]
        return pa.StructArray.from_arrays(columns, names=list(v.fields))
    return plain(batch.column(v.field))


def reduce_states(
    batch: pa.RecordBatch, variables: Sequence[Variable], ids: np.ndarray, n: int
) -> list[list]:
    """Per id 0..n-1, the state of every variable: ``states[id][variable]``."""
    columns = []
    for v in variables:
        if v.field is None and not v.fields:  # count of rows
            columns.append(np.bincount(ids, minlength=n).tolist())
        else:
            columns.append(aggregate_of(v).reduce(values_of(batch, v), ids, n))
    return [list(states) for states in zip(*columns, strict=True)] if columns else [[]] * n


def merge_states(variables: Sequence[Variable], left: list, right: list) -> list:
    return [aggregate_of(v).merge(a, b) for v, a, b in zip(variables, left, right, strict=True)]


def results(variables: Sequence[Variable], states: list) -> dict[str, Any]:
    return {v.name: aggregate_of(v).finalize(s) for v, s in zip(variables, states, strict=True)}


def empty_states(variables: Sequence[Variable]) -> list:
    return [aggregate_of(v).init() for v in variables]
