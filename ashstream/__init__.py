"""ashstream: stream DuckDB queries and Parquet files into Typst values."""

from ashstream import telemetry
from ashstream.aggregate import ClosedGroup, Summary
from ashstream.encode import (
    EncodeOptions,
    EncodeStats,
    encode_array,
    encode_rows,
    encode_value,
)
from ashstream.errors import (
    AshstreamError,
    Cancelled,
    EncodeError,
    PipelineError,
    ReportError,
    ResourceError,
    SinkError,
    SourceError,
    UnsupportedTypeError,
    WorkerCrashed,
)
from ashstream.pool import Chunk, StreamHandle, StreamPool
from ashstream.report import Report, load_report

__version__ = "0.1.0"

__all__ = [
    "AshstreamError",
    "Cancelled",
    "Chunk",
    "ClosedGroup",
    "EncodeError",
    "EncodeOptions",
    "EncodeStats",
    "PipelineError",
    "Report",
    "ReportError",
    "ResourceError",
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
    "telemetry",
]
