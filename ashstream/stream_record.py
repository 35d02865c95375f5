"""What ``ashstream status`` and ``pool.status()`` show of a stream: one record with the
same fields whichever engine runs it (the local pool publishes it in its registry, the
Ray driver in its status file)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("queued", "starting", "running", "paused", "completed", "failed", "cancelled")
ACTIVE = STATUSES[:4]  # a stream in one of these is in progress
FINISHED = STATUSES[4:]


@dataclass(frozen=True)
class StreamRecord:
    id: str
    report: str  # the report's name
    status: str  # one of STATUSES
    rows: int  # delivered to the caller
    total_rows: int | None  # when the source says so cheaply
    chunks: int
    bytes: int  # of Typst text
    started_at: float  # time.time()
    finished_at: float | None
    memory_bytes: int | None  # the engine's processes on this machine, at the last check
    memory_pss_bytes: int | None = None  # the local pool's tree (shared pages split)
    restarts: int = 0  # children of the local pool that died while it ran (Ray retries itself)
    redispatched: int = 0  # batches dispatched again after a transformer died
    skipped: list[tuple[int, int]] = field(default_factory=list)  # rows left out
    pids: dict[str, Any] = field(default_factory=dict)  # of the processes serving it
    error: str | None = None

    @property
    def rows_per_s(self) -> float:
        elapsed = (self.finished_at or time.time()) - self.started_at
        return self.rows / max(elapsed, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the registry, the status file and ``--json``."""
        return {**dataclasses.asdict(self), "rows_per_s": self.rows_per_s}


_EMPTY = {"int": 0, "float": 0.0, "str": "?"}  # a required field missing from a record


def completed(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with every field of a record, those it lacks empty: a run of another
    version of ashstream (started before an upgrade) may still be writing its own."""
    full: dict[str, Any] = {"rows_per_s": 0.0}
    for f in dataclasses.fields(StreamRecord):
        if f.default is not dataclasses.MISSING:
            full[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            full[f.name] = f.default_factory()
        else:
            full[f.name] = _EMPTY.get(str(f.type))
    return {**full, **entry}
