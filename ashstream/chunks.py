"""What every engine hands the caller: ``Chunk``s in source order, cut from a batch's
encoded text, and the ``Summary`` once the last one is taken."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import psutil
import pyarrow as pa

from ashstream.analysis.aggregate import Analysis, ClosedGroup, Collector, Summary
from ashstream.encode import EncodeStats
from ashstream.errors import PipelineError, ReportError, ResourceError
from ashstream.report import MAX_CHUNK_SIZE, Report

if TYPE_CHECKING:
    from ashstream.batch_job import EncodedBatch


@dataclass
class Chunk:
    """A run of consecutive rows, encoded: each row's Typst dictionary and ``,\\n``.

    ``groups`` holds the groups whose end this chunk revealed: each ended on the row
    before one of this chunk's rows (a group's end is known only when the next key is);
    in a cached run, those a unit's states closed, which may have ended before this
    chunk (:class:`~ashstream.cache.CacheMerge`). Either way in row order, chunk after
    chunk. The groups still open at the end come in :attr:`Summary.groups`.

    Its text may lie where the engine put it (a shared-memory slot, the batch's
    buffer): :attr:`text` copies it out as ``bytes`` once, and an engine that reuses
    the memory first makes every chunk still referenced take its copy
    (:meth:`detach`), so a chunk stays valid as long as it is kept.
    """

    seq: int
    first_row: int
    num_rows: int
    _text: bytes | pa.Buffer = field(repr=False)
    groups: list[ClosedGroup] = field(default_factory=list)

    @property
    def text(self) -> bytes:
        """The rows' text, as ``bytes`` (copied out of the engine's memory once)."""
        self.detach()
        return self._text

    def view(self) -> bytes | pa.Buffer:
        """The text without a copy, for a writer: valid until the next chunk is taken
        from the stream, so write it and drop it."""
        return self._text

    def detach(self) -> None:
        """Copy the text out of the engine's memory, which is about to be reused."""
        text = self._text
        if not isinstance(text, bytes):
            self._text = text.to_pybytes()

    def rows(self) -> list[str]:
        """One Typst dictionary literal per row (literals never hold a raw newline)."""
        return self.text.decode("utf-8").split(",\n")[:-1]


@dataclass
class FileChunk(Chunk):
    """Rows whose text lies in a file (a cache's text): ``length`` bytes at ``offset``
    of ``file``, which the module sink copies in the kernel (``text`` is empty) after
    :meth:`check_text`."""

    file: BinaryIO | None = None
    offset: int = 0
    length: int = 0
    check: Callable[[], None] | None = None  # raises when the text must not be used

    def check_text(self) -> None:
        if self.check is not None:
            self.check()

    def read_text(self) -> bytes:
        self.check_text()
        return os.pread(self.file.fileno(), self.length, self.offset)

    def rows(self) -> list[str]:
        return self.read_text().decode("utf-8").split(",\n")[:-1]


def cut_into_chunks(
    first_row: int,
    first_chunk: int,
    rows: int,
    chunk_ends: tuple[int, ...],
    chunk_size: int,
    text: pa.Buffer,
    closed: list[ClosedGroup],
) -> list[Chunk]:
    """A batch's chunks: at most ``chunk_size`` rows each, each with the groups whose end
    it revealed and a view of its part of the batch's ``text`` (no copy)."""
    chunks = []
    start = row = 0
    for i, end in enumerate(chunk_ends):
        taken = min(chunk_size, rows - row)
        first = first_row + row
        groups = [g for g in closed if first <= g.last_row + 1 < first + taken]
        chunks.append(Chunk(first_chunk + i, first, taken, text[start:end], groups))
        start, row = end, row + taken
    return chunks


def summary_of(collector: Collector | None, final_groups: list[ClosedGroup]) -> Summary:
    """A finished stream's totals, charts and the groups still open at its end."""
    if collector is None:
        return Summary([], {}, {})
    return Summary(final_groups, collector.report_totals(), collector.chart_results())


class OrderedMerge:
    """The caller's side of a stream, the same for every engine: takes each batch's
    encoded result in source order, merges its analysis partials and cuts it into
    chunks. Runs in the thread that takes the chunks."""

    def __init__(self, analysis: Analysis | None, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.collector = Collector(analysis) if analysis is not None else None
        self.lossy = EncodeStats()
        self.rows = 0  # rows taken so far; the next batch's first row
        self.bytes = 0  # of Typst text taken so far
        self.final_groups: list[ClosedGroup] = []
        self._next_chunk = 0
        self._finished = False

    def take(self, done: EncodedBatch) -> list[Chunk]:
        """The chunks of the next batch (which starts at row :attr:`rows`)."""
        closed = []
        if self.collector is not None and done.partial is not None:
            closed = self.collector.add(done.partial, self.rows)
        for column, reason, n in done.lossy:
            self.lossy.add(column, reason, n)
        text = done.text
        chunks = cut_into_chunks(
            self.rows,
            self._next_chunk,
            done.rows,
            done.chunk_ends,
            self.chunk_size,
            text,
            closed,
        )
        self.rows += done.rows
        self.bytes += len(text)
        self._next_chunk += len(done.chunk_ends)
        return chunks

    @property
    def chunks(self) -> int:
        """Chunks cut so far (a skipped batch's numbers included)."""
        return self._next_chunk

    def skip(self, rows: int) -> None:
        """Leave out the next batch, of ``rows`` rows (a batch the local engine skips
        under ``poison_policy="skip"``): the rows and chunks after it keep their numbers."""
        self.rows += rows
        self._next_chunk += -(-rows // self.chunk_size)

    def finish(self) -> None:
        """Every batch was taken: close the groups still open."""
        if self.collector is not None:
            self.final_groups = self.collector.finish()
        self._finished = True

    @property
    def summary(self) -> Summary:
        if not self._finished:
            raise PipelineError("the stream's summary exists once every chunk has been taken")
        return summary_of(self.collector, self.final_groups)


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as every engine takes it from Python: 1 to MAX_CHUNK_SIZE rows."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ReportError(
            f"chunk_size must be from 1 to {MAX_CHUNK_SIZE:,} rows, got {chunk_size:,}"
        )
    return chunk_size


def unshared_memory_bytes(children: bool = False, shared_bytes: int = 0) -> int:
    """The memory of this process (and, with ``children``, of all its descendants):
    resident memory less shared pages, per process, plus ``shared_bytes`` once (the
    local pool's arenas). Cheap: it reads ``statm``. The one measure every engine's
    memory limit is checked against."""
    total = shared_bytes
    me = psutil.Process(os.getpid())
    for process in [me, *me.children(recursive=True)] if children else [me]:
        try:
            info = process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += max(info.rss - getattr(info, "shared", 0), 0)
    return total


def check_memory_limit(report: Report, used: int, where: str) -> None:
    """Stop a stream merged in one process (``where``) past ``pipeline.memory_limit``:
    there is no admission to pause there, so the limit is a hard one.

    Raises:
        ResourceError: ``used`` bytes is over the report's limit.
    """
    limit = report.pipeline.memory_limit
    if limit is not None and used > limit:
        raise ResourceError(
            f"{where} used {used / 2**20:,.0f} MiB, over the report's pipeline.memory_limit "
            f"of {limit / 2**20:,.0f} MiB. Raise memory_limit, or use a smaller chunk_size"
        )


class MergedStream:
    """A stream whose results are merged in the caller's thread as it takes the chunks
    (in this process, or on Ray): iterate it once, then read ``columns``,
    ``total_rows`` and ``summary``. Subclasses yield the chunks from ``_chunks``."""

    def __init__(self, report: Report, chunk_size: int | None, min_batch_rows: int) -> None:
        chunk_size = check_chunk_size(chunk_size or report.pipeline.chunk_size)
        if min_batch_rows < 1:
            raise ReportError(f"min_batch_rows must be at least 1, got {min_batch_rows}")
        self.report = report
        self.chunk_size = chunk_size
        self.min_batch_rows = min_batch_rows
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.skipped: list[tuple[int, int]] = []  # a failed batch fails the stream
        self._analysis = Analysis.of(report)
        self._merge = OrderedMerge(self._analysis, chunk_size)
        self._iterator: Iterator[Chunk] | None = None

    @property
    def lossy(self) -> EncodeStats:
        """The values not represented exactly so far."""
        return self._merge.lossy

    @property
    def summary(self) -> Summary:
        return self._merge.summary

    def use_merge(self, merge: OrderedMerge) -> None:
        """Merge the stream's batches with ``merge`` (the cache's); before iterating."""
        self._merge = merge

    def __iter__(self) -> Iterator[Chunk]:
        if self._iterator is not None:
            raise PipelineError(
                f"a {type(self).__name__} is read once; start the report again to reread it"
            )
        self._iterator = self._chunks()
        return self._iterator

    def cancel(self) -> None:
        """Stop the stream and release what it holds."""
        if self._iterator is not None:
            self._iterator.close()

    def _chunks(self) -> Iterator[Chunk]:
        raise NotImplementedError
