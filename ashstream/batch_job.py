"""The work on one stream's batches that does not depend on where it runs.

``read_batches`` is what a producer does before a batch is handed on: open the source,
add the running values (they need every row in order, so the one reader carries them),
send the first chunk alone and cut batches to a size in bytes. ``encode_batch`` is what a
transformer does with a batch: the analysis partials, then the Typst text and where each
chunk of it ends; ``batch_failure`` is what the user is told when that fails. The pool
runs them in its producer and transformer processes, the Ray engine in tasks (and its
driver), and a small report in the calling process (``ashstream.engines.inline``).
Same code, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ashstream.analysis.aggregate import (
    Analysis,
    BatchPartial,
    RunningColumns,
    analyse_batch,
    row_columns,
)
from ashstream.cache_codec import CodecError, dumps
from ashstream.checksum import crc32
from ashstream.encode import EncodeOptions, EncodeStats, encode_rows_text
from ashstream.errors import INTERNAL_ERROR_ADVICE, AshstreamError, PipelineError
from ashstream.report import Report
from ashstream.sources import UNIT_KEY, OpenSource, open_source, parquet_head, parquet_row_count

# Rows read and encoded together at least, whatever the chunk size: encoding a batch
# costs about 1 ms of fixed overhead, so 1000-row chunks encoded one by one would run at
# half speed. The caller still gets chunks of at most chunk_size rows.
MIN_BATCH_ROWS = 16384
# Bytes of each shared-memory slot by default; a batch is cut to fit its share of one.
DEFAULT_SLOT_BYTES = 8 * 2**20
# An input batch may fill this share of a slot (1/4): Typst text is usually 2-4x the Arrow
# size, and the result must fit a slot of the same size to avoid the slow inline path.
INPUT_SHARE_OF_SLOT = 4
MARK_KEY = b"ashstream.mark"  # a batch's schema metadata: (unit, running state), codec
UNCACHEABLE = "uncacheable"  # a mark's running state the codec could not write


def input_bytes(slot_bytes: int) -> int:
    """The most Arrow IPC bytes a batch may take, for slots of ``slot_bytes``."""
    return slot_bytes // INPUT_SHARE_OF_SLOT


@dataclass
class BatchSource:
    columns: tuple[str, ...]  # the row dictionaries' keys, running values included
    schema: pa.Schema  # the source's, before running values are added
    total_rows: int | None  # when the source says so cheaply
    batches: Iterator[pa.RecordBatch]  # in source order, running values added
    close: Callable[[], None]  # the connection and spill folder, read to the end or not


def read_batches(
    report: Report,
    chunk_size: int,
    min_batch_rows: int = MIN_BATCH_ROWS,
    max_batch_bytes: int = input_bytes(DEFAULT_SLOT_BYTES),
    on_connect: Callable[[Any], None] | None = None,
    connection: Any = None,
    head_first: bool = False,
) -> BatchSource:
    """Open the report's source and stream its batches (see the module docstring): at
    most ``max_batch_bytes`` of Arrow IPC each, unless a single row is bigger.
    ``on_connect`` and ``connection`` as for :func:`ashstream.sources.open_source`.
    ``head_first``: where it can, the first chunk is read by pyarrow and handed on
    before DuckDB opens the source (:func:`ashstream.sources.parquet_head`), for a
    stream whose first chunk someone waits for; the batches are the same."""
    rows_per_batch = max(chunk_size, min_batch_rows)
    head = parquet_head(report, chunk_size) if head_first and chunk_size <= MIN_BATCH_ROWS else None
    if head is None:
        source = open_source(report, rows_per_batch, on_connect, connection)
    else:
        source = _HeadFirst(
            head,
            parquet_row_count(report),
            lambda: open_source(report, rows_per_batch, on_connect, connection, True),
        )
    analysis = Analysis.of(report)
    running = RunningColumns(analysis) if analysis is not None else None
    if running is not None:
        running.carry = dict(report.source.running_carry)
    if report.source.units:
        parts = _marked_parts(source.batches, running, chunk_size, max_batch_bytes)
    else:
        batches = source.batches if running is None else map(running.add, source.batches)
        parts = (
            part
            for batch in _first_chunk_alone(batches, chunk_size)
            for part in split_to_fit(batch, max_batch_bytes)
        )
    columns = row_columns(report, source.schema)
    return BatchSource(columns, source.schema, source.total_rows, parts, source.close)


class _HeadFirst:
    """A source whose first rows, ``head``, were read before DuckDB opened it (see
    :func:`read_batches`): yields them, then opens it and yields the rest of its rows,
    once DuckDB's own first rows are seen to be the same."""

    def __init__(
        self, head: pa.RecordBatch, total_rows: int | None, open_rest: Callable[[], OpenSource]
    ) -> None:
        self.schema = head.schema
        self.total_rows = total_rows
        self._head = head
        self._open_rest = open_rest
        self._rest: OpenSource | None = None
        self.batches = self._batches()

    def _batches(self) -> Iterator[pa.RecordBatch]:
        head = self._head
        yield head
        self._rest = rest = self._open_rest()
        if not rest.schema.equals(head.schema):
            raise _head_differs(f"columns {head.schema} against DuckDB's {rest.schema}")
        seen, due = [], head.num_rows
        for batch in rest.batches:
            if due:
                seen.append(batch.slice(0, due))
                due -= seen[-1].num_rows
                batch = batch.slice(seen[-1].num_rows)
                if not due:
                    _check_same_rows(head, seen)
            if batch.num_rows:
                yield batch
        if due:
            raise _head_differs(f"{head.num_rows} rows against DuckDB's {head.num_rows - due}")

    def close(self) -> None:
        if self._rest is not None:
            self._rest.close()


def _check_same_rows(head: pa.RecordBatch, seen: list[pa.RecordBatch]) -> None:
    """DuckDB's first rows (``seen``) are ``head``'s: the same values, or the same text
    (NaN is not equal to itself)."""
    duck = pa.Table.from_batches(seen).combine_chunks().to_batches()[0]
    if not duck.equals(head) and not encode_rows_text(duck)[0].equals(encode_rows_text(head)[0]):
        raise _head_differs("different values")


def _head_differs(what: str) -> PipelineError:
    return PipelineError(
        f"the source's first rows as pyarrow read them differ from DuckDB's ({what}). "
        f"{INTERNAL_ERROR_ADVICE}"
    )


def ipc_size(batch: pa.RecordBatch) -> int:
    """Bytes of ``batch`` as a complete IPC stream (schema, batch, end marker)."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.size()


def split_to_fit(batch: pa.RecordBatch, max_bytes: int) -> list[pa.RecordBatch]:
    """Row ranges of ``batch`` whose IPC form fits ``max_bytes`` (a single row always
    passes)."""
    size = ipc_size(batch)
    if size <= max_bytes or batch.num_rows <= 1:
        return [batch]
    rows = max(1, int(batch.num_rows * max_bytes / size * 0.9))
    parts = []
    for start in range(0, batch.num_rows, rows):
        parts += split_to_fit(batch.slice(start, rows), max_bytes)
    return parts


def _first_chunk_alone(
    batches: Iterator[pa.RecordBatch], chunk_size: int
) -> Iterator[pa.RecordBatch]:
    """The first chunk travels as a batch of its own, so that the caller sees it after
    encoding chunk_size rows rather than a whole batch."""
    for i, batch in enumerate(batches):
        if i == 0 and batch.num_rows > chunk_size:
            yield batch.slice(0, chunk_size)
            batch = batch.slice(chunk_size)
        yield batch


def _marked_parts(
    batches: Iterator[pa.RecordBatch],
    running: RunningColumns | None,
    chunk_size: int,
    max_bytes: int,
) -> Iterator[pa.RecordBatch]:
    """A source of units (``Source.units``, for the cache) cut as any other, each part
    marked (:data:`MARK_KEY`) with its unit and, on a batch's last part, the running
    state after it: what the cache's merge needs to write each unit's entry."""
    for i, batch in enumerate(batches):
        unit = int(batch.schema.metadata[UNIT_KEY])
        batch = batch.replace_schema_metadata(None)
        if running is not None:
            batch = running.add(batch)
        pieces = [batch]
        if i == 0 and batch.num_rows > chunk_size:  # as _first_chunk_alone
            pieces = [batch.slice(0, chunk_size), batch.slice(chunk_size)]
        parts = [part for piece in pieces for part in split_to_fit(piece, max_bytes)]
        carry = dict(running.carry) if running is not None else {}
        try:
            last = dumps((unit, carry))
        except CodecError:  # a running value the cache cannot hold: no entries from here
            last = dumps((unit, UNCACHEABLE))
        for j, part in enumerate(parts):
            mark = last if j == len(parts) - 1 else dumps((unit, None))
            yield part.replace_schema_metadata({MARK_KEY: mark})


@dataclass
class EncodedBatch:
    text: pa.Buffer  # each row's dictionary literal followed by ",\n"
    rows: int
    chunk_ends: tuple[int, ...]  # byte offset in the text where each chunk ends
    lossy: tuple[tuple[str, str, int], ...]  # (column, reason, count) from EncodeStats
    partial: BatchPartial | None  # groups, variables and charts of the batch
    mark: bytes | None = None  # the cache's: the batch's unit and running state after it
    text_crc: int | None = None  # for the cache, of a marked batch: where the text is hot


def encode_batch(
    batch: pa.RecordBatch,
    first_row: int,
    chunk_size: int,
    options: EncodeOptions,
    analysis: Analysis | None,
) -> EncodedBatch:
    """One batch → its Typst text, cut into chunks of at most ``chunk_size`` rows, and
    its analysis partials. ``first_row`` counts from the source's first row."""
    metadata = batch.schema.metadata
    mark = metadata.get(MARK_KEY) if metadata else None
    partial = None
    if analysis is not None:
        partial = analyse_batch(batch, analysis, first_row)
        if analysis.hidden:
            batch = batch.drop_columns(list(analysis.hidden))
    stats = EncodeStats()
    text, row_ends = encode_rows_text(batch, options=options, stats=stats)
    rows = batch.num_rows
    chunk_ends = tuple(
        int(row_ends[min(end, rows) - 1])
        for end in range(chunk_size, rows + chunk_size, chunk_size)
    )
    lossy = tuple((column, reason, n) for (column, reason), n in stats.counts.items())
    text_crc = crc32(text) if mark is not None else None
    return EncodedBatch(text, rows, chunk_ends, lossy, partial, mark, text_crc)


def batch_rows(first_row: int, rows: int, seq: int | str) -> str:
    """A batch's rows, counted from the source's first row, as the user sees them."""
    return f"rows {first_row}..{first_row + rows - 1} (batch {seq})"


def batch_failure(exc: Exception, first_row: int, rows: int, seq: int | str) -> AshstreamError:
    """What the user is told when the batch job fails on a batch: an ashstream error with
    the batch's rows named, or an internal error (its trace belongs in the debug log)."""
    where = batch_rows(first_row, rows, seq)
    if isinstance(exc, AshstreamError):
        return type(exc)(f"{where}: {exc.with_row_offset(first_row)}")
    return PipelineError(
        f"encoding failed on {where}: {type(exc).__name__}: {exc}. {INTERNAL_ERROR_ADVICE}"
    )
