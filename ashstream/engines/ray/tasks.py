"""What runs on the cluster: the Ray tasks that read and encode a report's batches.

Each task runs in a Ray worker process on any node. None raises on a failure of the
work: it returns the :class:`~ashstream.errors.AshstreamError` the user reads, so that
Ray neither wraps it in its own error nor retries it (Ray retries a task only when its
worker or node dies, ``MAX_TASK_RETRIES`` times).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from ashstream.batch_job import EncodedBatch, batch_failure, encode_batch, read_batches
from ashstream.encode import EncodeOptions
from ashstream.errors import INTERNAL_ERROR_ADVICE, AshstreamError, PipelineError, SourceError
from ashstream.report import Report

logger = logging.getLogger(__name__)

# Ray retries a task this many times when its worker or node dies (not when it raises).
MAX_TASK_RETRIES = 3


def encode(
    batch: Any,
    first_row: int,
    chunk_size: int,
    options: EncodeOptions,
    analysis: Any,
    seq: int | str,
) -> EncodedBatch | AshstreamError:
    """The batch job on one batch the driver read; a failure is returned as the error
    the user reads. Runs in a Ray worker."""
    try:
        return encode_batch(batch, first_row, chunk_size, options, analysis)
    except Exception as exc:
        if not isinstance(exc, AshstreamError):
            logger.debug("batch %s failed", seq, exc_info=True)
        return batch_failure(exc, first_row, batch.num_rows, seq)


def read_part(
    part: Report, schema: Any, chunk_size: int, min_batch_rows: int, max_batch_bytes: int
) -> tuple[int | AshstreamError, list[Any] | None]:
    """A part of the Parquet files, read by the driver's own code: its row count and
    batches, or the error, naming the part and the node (the node's files may differ
    from the driver's). Runs in a Ray worker."""
    where = f"{part_words(part)}, read on the Ray node {ray.util.get_node_ip_address()}"
    try:
        source = read_batches(part, chunk_size, min_batch_rows, max_batch_bytes)
        try:
            batches = list(source.batches)
        finally:
            source.close()
    except AshstreamError as exc:
        return type(exc)(f"{exc} ({where})"), None
    except Exception as exc:
        logger.debug("reading %s failed", where, exc_info=True)
        return PipelineError(f"{where}: {type(exc).__name__}: {exc}. {INTERNAL_ERROR_ADVICE}"), None
    if batches and batches[0].schema != schema:
        return SourceError(
            f"{where}: the part's columns are {batches[0].schema}, but the whole source's "
            f"are {schema} (a hive-partitioned path whose values differ in type?); read "
            "it with a DuckDB query source instead"
        ), None
    return sum(b.num_rows for b in batches), batches


def encode_part(
    batches: list[Any],
    first_row: int,
    chunk_size: int,
    options: EncodeOptions,
    analysis: Any,
    part: str,
) -> list[EncodedBatch] | AshstreamError:
    """A part's batches encoded where :func:`read_part` left them. Runs in a Ray worker."""
    done = []
    for i, batch in enumerate(batches):
        result = encode(batch, first_row, chunk_size, options, analysis, f"{i} of {part}")
        if isinstance(result, AshstreamError):
            return result
        done.append(result)
        first_row += batch.num_rows
    return done


def part_words(part: Report) -> str:
    """A part as the user's messages name it: its file and rows."""
    first, last = part.source.row_range or (0, 0)
    return f"{part.source.parquet[0]} rows {first}..{last - 1}"


# Retried when a worker or node dies, never when the function raised (it returns errors).
# Ray titles a task's worker process after the function: ``ray::encode``.
_TASK_OPTIONS = {"num_cpus": 1, "max_retries": MAX_TASK_RETRIES, "retry_exceptions": False}
encode_task = ray.remote(**_TASK_OPTIONS)(encode)
encode_part_task = ray.remote(**_TASK_OPTIONS)(encode_part)
read_part_task = ray.remote(**_TASK_OPTIONS, num_returns=2)(read_part)
