"""ashstream: stream DuckDB queries and Parquet files into Typst values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ashstream import telemetry
from ashstream.analysis.aggregate import ClosedGroup, Summary
from ashstream.analysis.protocol import Aggregate
from ashstream.chunks import Chunk
from ashstream.encode import (
    EncodeOptions,
    EncodeStats,
    encode_array,
    encode_rows,
    encode_value,
)
from ashstream.engines.inline import InlineStream
from ashstream.errors import (
    AshstreamError,
    Cancelled,
    EncodeError,
    PipelineError,
    ReportError,
    ResourceError,
    SettingsError,
    SinkError,
    SourceError,
    UnsupportedTypeError,
    WorkerCrashed,
)
from ashstream.report import Report, load_report

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "AshstreamError",
    "Cancelled",
    "Chunk",
    "ClosedGroup",
    "EncodeError",
    "EncodeOptions",
    "EncodeStats",
    "InlineStream",
    "PipelineError",
    "Report",
    "ReportError",
    "ResourceError",
    "RunProgress",
    "RunStage",
    "RunSummary",
    "SettingsError",
    "SinkError",
    "SourceError",
    "StreamHandle",
    "StreamPool",
    "Summary",
    "UnsupportedTypeError",
    "WorkerCrashed",
    "__version__",
    "encode_array",
    "encode_rows",
    "encode_value",
    "load_report",
    "run_report",
    "telemetry",
]


if TYPE_CHECKING:
    from ashstream.engines.local.pool import StreamHandle, StreamPool
    from ashstream.runner import RunProgress, RunStage, RunSummary, run_report

_RUNNER = ("RunProgress", "RunStage", "RunSummary", "run_report")


def __getattr__(name: str) -> object:
    """The pool and its process machinery load on first use (PEP 562): a small report
    that runs in the calling process never needs them, and a command starts sooner.
    The runner does too, as the sinks it imports import ``__version__`` from here."""
    if name in ("StreamPool", "StreamHandle"):
        from ashstream.engines.local import pool

        return getattr(pool, name)
    if name in _RUNNER:
        from ashstream import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'ashstream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
