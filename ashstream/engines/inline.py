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
import time
from collections.abc import Iterator

from ashstream import telemetry
from ashstream.analysis.aggregate import Analysis, ClosedGroup, Collector, Summary
from ashstream.batch_job import MIN_BATCH_ROWS, batch_failure, encode_batch, read_batches
from ashstream.chunks import Chunk, cut_into_chunks, summary_of
from ashstream.encode import EncodeOptions, EncodeStats
from ashstream.errors import AshstreamError, PipelineError, ReportError
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


class InlineStream:
    """The chunks of a report in source order, computed in this thread as they are
    taken: iterate it once, then read ``columns``, ``total_rows`` and ``summary``."""

    def __init__(
        self,
        report: Report,
        chunk_size: int | None = None,
        min_batch_rows: int = MIN_BATCH_ROWS,
    ) -> None:
        self.report = report
        self.chunk_size = chunk_size or report.pipeline.chunk_size
        if self.chunk_size < 1 or min_batch_rows < 1:
            raise ReportError(
                f"chunk_size and min_batch_rows must be at least 1, got {self.chunk_size} "
                f"and {min_batch_rows}"
            )
        self.min_batch_rows = min_batch_rows
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.skipped: list[tuple[int, int]] = []  # nothing is ever left out here
        self.lossy = EncodeStats()
        self.peak_memory_bytes = 0  # this process's resident memory, less shared pages
        self._analysis = Analysis.of(report)
        self._collector = Collector(self._analysis) if self._analysis is not None else None
        self._final_groups: list[ClosedGroup] = []
        self._started = False
        self._finished = False

    @property
    def summary(self) -> Summary:
        if not self._finished:
            raise PipelineError("the stream's summary exists once every chunk has been taken")
        return summary_of(self._collector, self._final_groups)

    def __iter__(self) -> Iterator[Chunk]:
        if self._started:
            raise PipelineError("an InlineStream is read once; make a new one to read again")
        self._started = True
        return self._chunks()

    def _chunks(self) -> Iterator[Chunk]:
        started = time.monotonic()
        metadata = {"stream_id": "inline", "report": self.report.name, "engine": "inline"}
        telemetry.emit("pipeline.started", {}, metadata)
        rows, status = 0, "failed"
        sweep_stale_spill_dirs()  # what killed runs left; a pool start does the same
        source = read_batches(self.report, self.chunk_size, self.min_batch_rows)
        try:
            self.columns, self.total_rows = source.columns, source.total_rows
            options = EncodeOptions(timezone=self.report.pipeline.timezone)
            first_chunk = 0
            for seq, batch in enumerate(source.batches):
                try:
                    done = encode_batch(batch, rows, self.chunk_size, options, self._analysis)
                except Exception as exc:
                    if not isinstance(exc, AshstreamError):
                        logger.debug("batch %d failed", seq, exc_info=True)
                    raise batch_failure(exc, rows, batch.num_rows, seq) from None
                closed = []
                if self._collector is not None and done.partial is not None:
                    closed = self._collector.add(done.partial, rows)
                for column, reason, n in done.lossy:
                    self.lossy.add(column, reason, n)
                text = done.text
                yield from cut_into_chunks(
                    rows,
                    first_chunk,
                    done.rows,
                    done.chunk_ends,
                    self.chunk_size,
                    lambda start, end, text=text: text[start:end].to_pybytes(),
                    closed,
                )
                rows += done.rows
                first_chunk += len(done.chunk_ends)
                self.peak_memory_bytes = max(self.peak_memory_bytes, _unshared_rss())
            if self._collector is not None:
                self._final_groups = self._collector.finish()
            self._finished, status = True, "completed"
        except GeneratorExit:
            status = "cancelled"
            raise
        except AshstreamError as exc:
            telemetry.emit(
                "pipeline.failed",
                {"rows": rows},
                {**metadata, "error": str(exc), "error_type": type(exc).__name__},
            )
            raise
        finally:
            source.batches.close()  # the DuckDB connection and its spill folder
            telemetry.emit(
                "pipeline.stopped",
                {"rows": rows, "duration_s": time.monotonic() - started},
                {**metadata, "status": status},
            )


def _unshared_rss() -> int:
    """Resident memory less shared pages, as the pool's health loop counts a process."""
    with open("/proc/self/statm") as statm:
        _, resident, shared, *_ = (int(n) for n in statm.read().split())
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
