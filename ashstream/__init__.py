"""ashstream: stream DuckDB queries and Parquet files into Typst values."""

from ashstream.encode import (
    EncodeOptions,
    EncodeStats,
    encode_array,
    encode_rows,
    encode_value,
)
from ashstream.errors import AshstreamError, EncodeError, UnsupportedTypeError

__version__ = "0.1.0"

__all__ = [
    "AshstreamError",
    "EncodeError",
    "EncodeOptions",
    "EncodeStats",
    "UnsupportedTypeError",
    "__version__",
    "encode_array",
    "encode_rows",
    "encode_value",
]
