"""A report run in the calling process: no worker processes, the same bytes as the pool.

Starting a pool costs a third of a second or more (a fork server, processes, DuckDB in
each producer); a report over a few hundred thousand rows is done sooner by one process.
``InlineStream`` runs the very batch job the pool's processes run
(``ashstream.batch_job``), cut to the same batches, and merges the analysis with the
same collector, so its chunks, groups, totals, charts and errors are those the pool
would give.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from ashstream import telemetry
from ashstream.batch_job import MIN_BATCH_ROWS, batch_failure, encode_batch, read_batches
from ashstream.chunks import Chunk, MergedStream
from ashstream.encode import EncodeOptions
from ashstream.errors import AshstreamError
from ashstream.report import Report
from ashstream.sources import parquet_row_count, sweep_stale_spill_dirs

logger = logging.getLogger(__name__)

# Reports over at most this many rows run in the calling process when the row count is
# known before reading (Parquet metadata), on 2 cores; the line is scaled down for more
# cores (see runs_inline). Measured on 2 cores (benchmarks/bench_pipeline.py --small,
# medians of 3): in this process against a pool, 0.43 s / 0.71 s at 10k rows, 0.81 s /
# 1.03 s at 300k, 1.94 s / 1.81 s at 1M.
INLINE_MAX_ROWS = 500_000


def inline_max_rows(cores: int) -> int:
    """The default line for ``cores`` cores: a pool's rate grows with its workers while
    one process's does not, so the crossover moves down about as the cores go up (an
    extrapolation from the 2-core measurement, not a measurement)."""
    return INLINE_MAX_ROWS * 2 // max(2, cores)


def runs_inline(report: Report, max_rows: int) -> bool:
    """Whether ``report``'s source is known to be small enough to run in this process."""
    rows = parquet_row_count(report, stop_above=max_rows) if max_rows > 0 else None
    return rows is not None and rows <= max_rows


class InlineStream(MergedStream):
    """The chunks of a report in source order, computed in this thread as they are
    taken: iterate it once, then read ``columns``, ``total_rows`` and ``summary``."""

    def __init__(
        self,
        report: Report,
        chunk_size: int | None = None,
        min_batch_rows: int = MIN_BATCH_ROWS,
    ) -> None:
        super().__init__(report, chunk_size, min_batch_rows)
        self.peak_memory_bytes = 0  # this process's resident memory, less shared pages

    def _chunks(self) -> Iterator[Chunk]:
        metadata = {"stream_id": "inline", "report": self.report.name, "engine": "inline"}
        merge = self._merge
        with telemetry.stream_events(metadata, lambda: merge.rows) as outcome:
            sweep_stale_spill_dirs()  # what killed runs left; a pool start does the same
            source = read_batches(self.report, self.chunk_size, self.min_batch_rows)
            try:
                self.columns, self.total_rows = source.columns, source.total_rows
                options = EncodeOptions(timezone=self.report.pipeline.timezone)
                for seq, batch in enumerate(source.batches):
                    try:
                        done = encode_batch(
                            batch, merge.rows, self.chunk_size, options, self._analysis
                        )
                    except Exception as exc:
                        if not isinstance(exc, AshstreamError):
                            logger.debug("batch %d failed", seq, exc_info=True)
                        raise batch_failure(exc, merge.rows, batch.num_rows, seq) from None
                    yield from merge.take(done)
                    self.peak_memory_bytes = max(self.peak_memory_bytes, unshared_rss())
                merge.finish()
                outcome["status"] = "completed"
            finally:
                source.close()  # the DuckDB connection and its spill folder


def unshared_rss() -> int:
    """Resident memory less shared pages, as the pool's health loop counts a process."""
    with open("/proc/self/statm") as statm:
        _, resident, shared, *_ = (int(n) for n in statm.read().split())
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
