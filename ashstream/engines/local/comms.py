"""The messages that cross process boundaries: small and picklable, and ``Chunk``.

Each process has one duplex pipe to the parent (one pipe per child, as mpire does since
2.1), so a SIGKILLed child can never wedge a lock shared with another. In the parent,
only the dispatcher thread reads a child's pipe and only that child's outbox thread
writes to it. Data does not travel here: batches and results live in the stream's
shared-memory arena (``ashstream.engines.local.shm``); a message names the slot. The
exceptions are a single row too big for any slot and a result too big for its slot,
which travel inline as bytes.

    parent --ProducerJob--> producer --SourceOpened/BatchProduced/SourceDone/StageFailed--> parent
    parent --SlotCredit---> producer        (a free input slot: credit-based backpressure)
    parent --StopStream---> producer        (a stream was cancelled or failed)
    parent --Task---------> transformer --TaskDone/StageFailed--> parent
    parent --ReleaseArena-> transformer     (the stream is over: unmap its arena)
    parent --STOP---------> any child
    any child --LogLine---> parent          (its log records)

Because of the outbox threads (``Outbox`` in ``ashstream.engines.local.children``) no
other thread ever blocks on a full pipe, so an inline message may be as large as memory
allows.
"""

from __future__ import annotations

from dataclasses import dataclass

STOP = "stop"  # ask a child process to exit after its current work
READY = "ready"  # a child finished importing and waits for work


@dataclass(frozen=True)
class ArenaRef:
    name: str
    slot_bytes: int
    slots: int


@dataclass(frozen=True)
class ProducerJob:
    stream_id: str
    report: object  # ashstream.report.Report
    chunk_size: int
    arena: ArenaRef
    input_slots: tuple[int, ...]  # slots the producer may write into at the start
    min_batch_rows: int  # rows read and encoded together at least


@dataclass(frozen=True)
class SlotCredit:
    stream_id: str
    slot: int


@dataclass(frozen=True)
class StopStream:
    stream_id: str


@dataclass(frozen=True)
class SourceOpened:
    stream_id: str
    columns: tuple[str, ...]
    total_rows: int | None


@dataclass(frozen=True)
class BatchProduced:
    """A batch in a slot. Batches are the unit of transport and encoding; the caller's
    chunks (at most ``chunk_size`` rows) are consecutive slices of one batch."""

    stream_id: str
    seq: int  # batch number in source order, the only key for ordering
    first_row: int
    first_chunk: int  # seq of the batch's first chunk
    rows: int
    slot: int | None  # None: the batch travels inline (a row bigger than a slot)
    nbytes: int
    inline: bytes | None = None


@dataclass(frozen=True)
class SourceDone:
    stream_id: str
    batches: int
    rows: int


@dataclass(frozen=True)
class StageFailed:
    """A child could not do its work; ``kind`` names the ashstream error class."""

    stream_id: str
    seq: int | None
    kind: str
    message: str


@dataclass(frozen=True)
class Task:
    stream_id: str
    arena: ArenaRef
    seq: int
    first_row: int
    rows: int
    in_slot: int | None
    in_nbytes: int
    out_slot: int
    timezone: str
    chunk_size: int
    inline: bytes | None = None
    analysis: object = None  # ashstream.analysis.aggregate.Analysis: groups, variables, charts


@dataclass(frozen=True)
class TaskDone:
    stream_id: str
    seq: int
    rows: int
    out_slot: int
    nbytes: int
    chunk_ends: tuple[int, ...]  # byte offset in the text where each chunk ends
    lossy: tuple[tuple[str, str, int], ...] = ()  # (column, reason, count) from EncodeStats
    inline: bytes | None = None  # the text, when it did not fit the result slot
    partial: object = None  # ashstream.analysis.aggregate.BatchPartial, when the stream analyses
    mark: bytes | None = None  # EncodedBatch.mark: for the cache, the batch's unit
    text_crc: int | None = None  # EncodedBatch.text_crc


@dataclass(frozen=True)
class ReleaseArena:
    name: str


@dataclass(frozen=True)
class LogLine:
    """A child's log record, re-emitted in the parent so that it lands where the
    parent's logging goes (above the live display, or as JSON) instead of on a raw
    stderr."""

    logger: str
    level: int
    message: str
    role: str
    pid: int
