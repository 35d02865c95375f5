"""A report run in the calling process: no worker processes, the same bytes as the pool.

Starting a pool costs about a second (a fork server, then every child imports pyarrow
and DuckDB); a report over a few hundred thousand rows is done sooner by one process.
``InlineStream`` runs the very batch job the pool's processes run
(``ashstream.batch_job``) and merges the analysis with the same collector, so its chunks,
groups, totals and charts are those the pool would give.
"""

from __future__ import annotations

from collections.abc import Iterator

from ashstream.aggregate import Analysis, ClosedGroup, Collector, Summary
from ashstream.batch_job import MIN_BATCH_ROWS, encode_batch, read_batches
from ashstream.encode import EncodeOptions, EncodeStats
from ashstream.errors import PipelineError
from ashstream.pipeline.collector import cut_into_chunks, summary_of
from ashstream.pipeline.comms import Chunk
from ashstream.report import Report
from ashstream.sources import parquet_row_count

# Reports over at most this many rows run in the calling process when the row count is
# known before reading (Parquet metadata). Measured on 2 cores (benchmarks/bench_pipeline.py
# --small, medians of 3): in this process against a pool, 0.43 s / 0.71 s at 10k rows,
# 0.81 s / 1.03 s at 300k, 1.94 s / 1.81 s at 1M. The pool's lead grows with cores, so
# the line sits below the 2-core crossover.
INLINE_MAX_ROWS = 500_000


def runs_inline(report: Report, max_rows: int = INLINE_MAX_ROWS) -> bool:
    """Whether ``report``'s source is known to be small enough to run in this process."""
    rows = parquet_row_count(report) if max_rows > 0 else None
    return rows is not None and rows <= max_rows


class InlineStream:
    """The chunks of a report in source order, computed in this thread as they are
    taken; the same interface as :class:`ashstream.StreamHandle` for a caller that
    iterates once."""

    def __init__(
        self, report: Report, chunk_size: int, min_batch_rows: int = MIN_BATCH_ROWS
    ) -> None:
        self.report = report
        self.chunk_size = chunk_size
        self.min_batch_rows = min_batch_rows
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.skipped: list[tuple[int, int]] = []  # nothing is ever left out here
        self.lossy = EncodeStats()
        self._analysis = Analysis.of(report)
        self._collector = Collector(self._analysis) if self._analysis is not None else None
        self._final_groups: list[ClosedGroup] = []
        self._finished = False

    @property
    def summary(self) -> Summary:
        if not self._finished:
            raise PipelineError("the stream's summary exists once every chunk has been taken")
        return summary_of(self._collector, self._final_groups)

    def __iter__(self) -> Iterator[Chunk]:
        source = read_batches(self.report, self.chunk_size, self.min_batch_rows)
        self.columns, self.total_rows = source.columns, source.total_rows
        options = EncodeOptions(timezone=self.report.pipeline.timezone)
        first_row = first_chunk = 0
        for batch in source.batches:
            done = encode_batch(batch, first_row, self.chunk_size, options, self._analysis)
            closed = []
            if self._collector is not None and done.partial is not None:
                closed = self._collector.add(done.partial, first_row)
            for column, reason, n in done.lossy:
                self.lossy.add(column, reason, n)
            text = done.text
            yield from cut_into_chunks(
                first_row,
                first_chunk,
                done.rows,
                done.chunk_ends,
                self.chunk_size,
                lambda start, end, text=text: text[start:end].to_pybytes(),
                closed,
            )
            first_row += done.rows
            first_chunk += len(done.chunk_ends)
        if self._collector is not None:
            self._final_groups = self._collector.finish()
        self._finished = True
