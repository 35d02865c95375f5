"""A report run in the calling process: no worker processes, the same bytes as the pool.

Starting a pool costs a third of a second or more (a fork server, processes, DuckDB in
each producer); a report over a few hundred thousand rows is done sooner by one process.
``InlineStream`` runs the very batch job the pool's processes run
(``ashstream.batch_job``), cut to the same batches, and hands them to the same
:class:`~ashstream.chunks.OrderedMerge`, so its chunks, groups, totals, charts and
errors are those the pool would give.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ashstream import telemetry
from ashstream.batch_job import (
    MIN_BATCH_ROWS,
    EncodedBatch,
    batch_failure,
    encode_batch,
    read_batches,
)
from ashstream.chunks import Chunk, MergedStream, check_memory_limit, unshared_memory_bytes
from ashstream.encode import EncodeOptions
from ashstream.errors import AshstreamError
from ashstream.report import Report
from ashstream.sources import parquet_row_count, sweep_stale_spill_dirs

logger = logging.getLogger(__name__)

# Reports over at most this many rows run in the calling process when the row count is
# known before reading (Parquet metadata), on 2 cores; the line is scaled down for more
# cores (see inline_max_rows). Below it, this process finishes before a pool of 2 workers
# would (the pool's start-up outweighs its parallel merge); above it, the pool is ahead.
# The measurements are in README ("Performance"), from benchmarks/bench_pipeline.py.
INLINE_MAX_ROWS = 2_000_000
# Seconds between two checks of this process's memory. Reading /proc waits on the
# memory map's lock while the encoding threads map their buffers: checked at every
# batch, it took 10 % of a 2M-row run (0.18 s, up to 7 ms a check).
MEMORY_CHECK_S = 0.1


def inline_max_rows(cores: int) -> int:
    """The default line for ``cores`` cores. Both engines use every core, but this one
    merges, and runs the Python part of encoding, under one GIL: the pool pulls ahead as
    the cores go up, so the line moves down about as they do (an extrapolation from the
    2-core measurement, not a measurement)."""
    return INLINE_MAX_ROWS * 2 // max(2, cores)


def runs_inline(report: Report, max_rows: int) -> bool:
    """Whether ``report``'s source is known to be small enough to run in this process."""
    rows = parquet_row_count(report, stop_above=max_rows) if max_rows > 0 else None
    return rows is not None and rows <= max_rows


class InlineStream(MergedStream):
    """The chunks of a report in source order, computed as they are taken: iterate it
    once, then read ``columns``, ``total_rows`` and ``summary``.

    The caller's thread reads the source and merges; ``threads`` threads (one per core by
    default) encode the batches, a few ahead of the merge. pyarrow's kernels, most of
    the encoding, run without the GIL, and DuckDB reads the next batch meanwhile."""

    def __init__(
        self,
        report: Report,
        chunk_size: int | None = None,
        min_batch_rows: int = MIN_BATCH_ROWS,
        threads: int | None = None,
    ) -> None:
        super().__init__(report, chunk_size, min_batch_rows)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.peak_memory_bytes = 0  # this process's resident memory, less shared pages
        self._measured_at = float("-inf")  # monotonic

    def _chunks(self) -> Iterator[Chunk]:
        metadata = {"stream_id": "inline", "report": self.report.name, "engine": "inline"}
        merge = self._merge
        with telemetry.stream_events(metadata, lambda: merge.rows) as outcome:
            sweep_stale_spill_dirs()  # what killed runs left; a pool start does the same
            source = read_batches(self.report, self.chunk_size, self.min_batch_rows)
            encoders = ThreadPoolExecutor(self.threads, thread_name_prefix="ashstream-encode")
            try:
                self.columns, self.total_rows = source.columns, source.total_rows
                options = EncodeOptions(timezone=self.report.pipeline.timezone)
                # (seq, first row, rows, its encoding): two per thread, so that each
                # thread has a batch waiting while the oldest is merged
                in_flight: collections.deque[tuple[int, int, int, Future[EncodedBatch]]]
                in_flight = collections.deque()
                first_row = self.report.source.first_row  # the cache's units: not 0
                batches = enumerate(source.batches)
                while True:
                    try:
                        seq, batch = next(batches, (-1, None))
                    except Exception as read_error:
                        # what was read before the error comes first, and its own errors
                        while in_flight:
                            yield from merge.take(_result(*in_flight.popleft()))
                        raise read_error
                    if batch is None:
                        break
                    encoding = encoders.submit(
                        encode_batch, batch, first_row, self.chunk_size, options, self._analysis
                    )
                    in_flight.append((seq, first_row, batch.num_rows, encoding))
                    first_row += batch.num_rows
                    # merge what is encoded at the head; wait for the oldest only when full
                    while in_flight and (
                        len(in_flight) >= 2 * self.threads or in_flight[0][3].done()
                    ):
                        yield from merge.take(_result(*in_flight.popleft()))
                        self._measure_memory()
                while in_flight:
                    yield from merge.take(_result(*in_flight.popleft()))
                self._measure_memory(always=True)
                merge.finish()
                outcome["status"] = "completed"
            finally:
                encoders.shutdown(cancel_futures=True)  # waits for the batches being encoded
                source.close()  # the DuckDB connection and its spill folder

    def _measure_memory(self, always: bool = False) -> None:
        now = time.monotonic()
        if now - self._measured_at < MEMORY_CHECK_S and not always:
            return
        self._measured_at = now
        used = unshared_memory_bytes()
        self.peak_memory_bytes = max(self.peak_memory_bytes, used)
        check_memory_limit(self.report, used, "this process")


def _result(seq: int, first_row: int, rows: int, encoding: Future[EncodedBatch]) -> EncodedBatch:
    try:
        return encoding.result()
    except Exception as exc:
        if not isinstance(exc, AshstreamError):
            logger.debug("batch %d failed", seq, exc_info=True)
        raise batch_failure(exc, first_row, rows, seq) from None
