"""The aggregate protocol: what every function a variable or chart computes implements,
the built-in ones (:mod:`ashstream.analysis.functions`) and those users write.

A report's ``function: NAME`` that is not built in names an *installed* aggregate: an
entry point of the group ``ashstream.aggregates`` whose object is a factory (a class, most
often) called with the variable's ``options`` to give an :class:`Aggregate`. A YAML
report cannot name code by path, so it runs only what was installed. From Python,
``load_report(path, aggregates={"name": Factory})`` passes a factory directly; it then
travels to the worker processes by pickle (so it must be importable by name there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "ENTRY_POINT_GROUP",
    "Aggregate",
    "BatchAggregate",
    "installed_aggregates",
    "load_factory",
    "split_by_ids",
]

ENTRY_POINT_GROUP = "ashstream.aggregates"


class Aggregate:
    """An aggregate over the values of a group, computed in parallel per batch.

    Each batch's values of a group become a state (:meth:`update` from :meth:`init`);
    the parent merges the states of consecutive batches in row order (:meth:`merge`,
    ``left`` before ``right``) and reports :meth:`finalize` of the group's state.

    The result must not depend on where the batches were cut (ashstream promises the
    same output for every chunk size, worker count and engine): ``merge`` must be exact
    and associative, e.g. integers or :class:`fractions.Fraction` sums, not float ones.
    States travel between processes by pickle; keep them small (the open groups'
    states stay in memory until the group closes).

    :meth:`finalize` returns the result as a Python value that ashstream writes as a
    Typst literal: ``None``, ``bool``, ``int``, ``float``, ``decimal.Decimal``, ``str``,
    ``datetime.date``/``datetime``, and lists and dicts of those.
    """

    def init(self) -> Any:
        """The state of no rows."""
        raise NotImplementedError

    def update(self, state: Any, values: pa.Array) -> Any:
        """``state`` with one batch's values of the group added (nulls included; a
        struct array when the variable names several ``fields``)."""
        raise NotImplementedError

    def merge(self, left: Any, right: Any) -> Any:
        """The state of ``left``'s rows followed by ``right``'s. It may update ``left`` in
        place and return it (the parent owns it); it must not change ``right``."""
        raise NotImplementedError

    def finalize(self, state: Any) -> Any:
        """The result of a group."""
        raise NotImplementedError

    def check(self, field_type: pa.DataType) -> str | None:
        """Why a field of ``field_type`` cannot be aggregated (shown to the user), or
        None when it can."""
        return None

    def held_bytes(self, state: Any) -> int:
        """Memory ``state`` holds that grows with the group's rows (0: bounded); the
        parent stops a run whose open groups hold too much."""
        return 0

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        """The state of every group 0..n-1 of a batch, ``ids[i]`` being row i's group.
        Built-in functions do this for all groups at once; this default slices the
        batch per group and calls :meth:`update`."""
        return [
            self.update(self.init(), values.take(pa.array(rows))) if len(rows) else self.init()
            for rows in split_by_ids(ids, n)
        ]


class BatchAggregate(Aggregate):
    """An aggregate that reduces a whole batch at once (:meth:`reduce`, vectorised);
    one group's values are a batch of one group."""

    def update(self, state: Any, values: pa.Array) -> Any:
        return self.merge(state, self.reduce(values, np.zeros(len(values), np.int64), 1)[0])

    def reduce(self, values: pa.Array, ids: np.ndarray, n: int) -> list:
        raise NotImplementedError


def split_by_ids(ids: np.ndarray, n: int) -> list[np.ndarray]:
    """Row numbers of each id 0..n-1, in row order."""
    if len(ids) and np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
    else:
        order = np.arange(len(ids))
    return [order[a:b] for a, b in id_spans(ids, n)]


def id_spans(ids: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Where each id 0..n-1 lies, as (start, end), in an array sorted by id."""
    ends = np.cumsum(np.bincount(ids, minlength=n)).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def installed_aggregates() -> dict[str, Any]:
    """The entry points of ``ashstream.aggregates`` by name (not yet loaded)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_factory(name: str, given: Mapping[str, Callable[..., Aggregate]] | None) -> Any:
    """The factory of aggregate ``name``: passed from Python, else installed; None
    when there is neither. Errors importing an installed one propagate."""
    if given and name in given:
        return given[name]
    entry = installed_aggregates().get(name)
    return entry.load() if entry is not None else None
