"""One stream as the parent sees it: its batches between producer and caller, and its record.

Guarded by the dispatcher's lock. The dispatcher writes its batches' state
(``work``, through :class:`.admission.Admission` for its slots) and the caller's thread reads results out of :class:`ResultOrder` in ``seq``
order, into the :class:`~ashstream.chunks.OrderedMerge` every engine uses.

The reorder window is bounded by the arena (a batch is dispatched only with a free
result slot, and the oldest undelivered batch always holds one), so waiting for the next
``seq`` cannot deadlock.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any

from ashstream.analysis.aggregate import Analysis
from ashstream.chunks import Chunk, OrderedMerge
from ashstream.engines.local.comms import ArenaRef, BatchProduced, TaskDone
from ashstream.engines.local.shm import Arena
from ashstream.errors import AshstreamError
from ashstream.report import Report
from ashstream.stream_record import StreamRecord


class ResultOrder:
    """One stream's finished batches, handed out in ``seq`` order whatever order they
    finish in. Not thread-safe: the dispatcher's lock guards it."""

    def __init__(self) -> None:
        # seq -> (batch, its result slot, its result: None for one left out)
        self.done: dict[int, tuple[BatchProduced, int, TaskDone | None]] = {}
        self.next_seq = 0  # the batch the caller gets next
        self.total_batches: int | None = None  # known once the source is done

    def put(self, batch: BatchProduced, out_slot: int, result: TaskDone | None) -> None:
        """A batch's result; None for a batch left out (poison_policy="skip")."""
        self.done[batch.seq] = (batch, out_slot, result)

    def has_next(self) -> bool:
        """The caller could take a batch now: a stall here is the caller's, not ours."""
        return self.next_seq in self.done

    def take(self) -> tuple[BatchProduced, int, TaskDone | None]:
        """The next batch in order; call only when :meth:`has_next`."""
        return self.done.pop(self.next_seq)

    def taken(self) -> None:
        """The caller has every chunk of the batch it took."""
        self.next_seq += 1

    def finished(self) -> bool:
        return self.total_batches is not None and self.next_seq >= self.total_batches


class StreamWork:
    """A stream's batches on their way through the pool; written by the dispatcher."""

    def __init__(self, window: int) -> None:
        self.input_slots = tuple(range(window))  # the producer's at the start
        self.free_results: deque[int] = deque(range(window, 2 * window))
        self.producer: int | None = None  # the slot of the producer reading it
        self.source_done = False  # the producer read the source to its end
        self.produced: deque[BatchProduced] = deque()  # not dispatched yet, in seq order
        self.retry: deque[tuple[BatchProduced, int]] = deque()  # a dead transformer's batches
        self.in_flight: dict[int, tuple[BatchProduced, int]] = {}  # seq -> (batch, out slot)
        self.kills: dict[int, int] = {}  # seq -> transformers that died running it


class StreamState:
    """Everything the parent knows about one stream."""

    def __init__(self, stream_id: str, report: Report, chunk_size: int, arena: Arena, window: int):
        self.id = stream_id
        self.report = report
        self.chunk_size = chunk_size
        self.analysis = Analysis.of(report)
        self.arena = arena
        self.arena_ref = ArenaRef(arena.name, arena.slot_bytes, arena.slots)
        self.work = StreamWork(window)
        self.results = ResultOrder()  # encoded batches, until the caller takes them
        self.merge = OrderedMerge(self.analysis, chunk_size)  # in the caller's thread
        self.merge_finished = False  # the caller reached the end: the merge is finished
        self.pending: deque[Chunk] = deque()  # chunks of a taken batch, not yet yielded
        # (result slot, the chunks viewing it) while its chunks are lent to the caller
        self.lent: tuple[int, list[weakref.ref[Chunk]]] | None = None
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.rows = self.chunks = self.bytes = 0  # delivered to the caller
        self.restarts = 0  # deaths of the pool's children while this stream ran
        self.redispatched = 0  # its batches dispatched again after a transformer died
        self.skipped: list[tuple[int, int]] = []  # row ranges left out (poison_policy="skip")
        self.error: AshstreamError | None = None
        self.status = "queued"
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.last_progress = time.monotonic()  # a batch read, encoded or taken by the caller
        self.closing = False  # close_stream has begun: nothing of it runs again
        self.released = threading.Event()  # the dispatcher told the children it is over
        self.caller_waits = False  # its caller waits in next_chunk (read while queued)

    def settled(self) -> bool:
        """Failed or being closed: nothing of it will be dispatched again."""
        return self.error is not None or self.closing

    def caller_can_take(self) -> bool:
        """Whether its caller has something to take now: chunks, a batch or the end."""
        return bool(self.pending) or self.results.has_next() or self.results.finished()

    def record(self, pids: dict[str, Any], memory: tuple[int | None, int | None]) -> StreamRecord:
        """Its record for ``ashstream status``; ``pids``: of the processes serving it;
        ``memory``: the pool tree's unshared and PSS bytes at the last health check."""
        return StreamRecord(
            id=self.id,
            report=self.report.name,
            status=self.status,
            rows=self.rows,
            total_rows=self.total_rows,
            chunks=self.chunks,
            bytes=self.bytes,
            started_at=self.started_at,
            finished_at=self.finished_at,
            memory_bytes=memory[0],
            memory_pss_bytes=memory[1],
            restarts=self.restarts,
            redispatched=self.redispatched,
            skipped=list(self.skipped),
            pids=pids,
            error=str(self.error) if self.error else None,
        )
