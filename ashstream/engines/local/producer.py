"""The producer process: sources → Arrow IPC in shared-memory slots → descriptors to the parent.

A producer process serves several streams at once, one thread and one DuckDB connection
each (DuckDB and Arrow release the GIL while they work). Sharing it keeps memory flat
however many streams run: each process costs ~50 MB once its imports and DuckDB are up.
A stream writes a batch only into a slot the parent credited to it, so it can never run
further ahead of the transformers than its arena allows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pyarrow as pa

from ashstream.batch_job import input_bytes, read_batches
from ashstream.engines.local.child import ChildParams, run_child
from ashstream.engines.local.comms import (
    READY,
    STOP,
    BatchProduced,
    ProducerJob,
    SlotCredit,
    SourceDone,
    SourceOpened,
    StageFailed,
    StopStream,
)
from ashstream.engines.local.shm import Arena
from ashstream.errors import INTERNAL_ERROR_ADVICE, AshstreamError

logger = logging.getLogger(__name__)

# See _serve: long enough for a stream's first chunk to be out, before the connection
# for the next stream is made beside it.
SPARE_AFTER_IDLE_S = 0.1


class _Stopped(Exception):
    """The parent asked this stream to stop."""


class _Job:
    """One stream being produced: its thread, its credits, its DuckDB connection."""

    def __init__(self, job: ProducerJob, send: Callable[[object], None], spare: Any) -> None:
        self.job = job
        self.send = send
        self.spare = spare  # a DuckDB connection made in advance, or None
        self.credits: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # None: stop
        self.stopped = threading.Event()
        self.connection: Any = None  # set from the job's thread, read to interrupt it
        self.rows_sent = 0  # rows handed to the parent so far, for error messages
        self.thread = threading.Thread(
            target=self.run, name=f"ashstream-produce-{job.stream_id}", daemon=True
        )

    def stop(self) -> None:
        self.stopped.set()
        self.credits.put(None)
        connection = self.connection
        if connection is not None:
            try:
                connection.interrupt()  # a long query gives up at once
            except Exception:
                pass

    def run(self) -> None:
        arena = None
        try:
            arena = Arena.attach(
                self.job.arena.name, self.job.arena.slot_bytes, self.job.arena.slots
            )
            self.produce(arena)
        except _Stopped:
            pass
        except AshstreamError as exc:
            self._report(type(exc).__name__, str(exc))
        except Exception as exc:
            if not _is_pipe_error(exc):  # else the parent is gone and nobody listens
                where = f"producer failed after row {self.rows_sent} of stream {self.job.stream_id}"
                logger.debug(where, exc_info=exc)
                self._report(
                    "PipelineError",
                    f"{where}: {type(exc).__name__}: {exc}. {INTERNAL_ERROR_ADVICE}",
                )
        finally:
            if arena is not None:
                arena.close()
            if self.spare is not None and self.connection is None:
                self.spare.close()  # handed over but never used: the stream ended first

    def _report(self, kind: str, message: str) -> None:
        """Tell the parent the stream failed, unless the parent stopped it first."""
        if self.stopped.is_set():
            return
        try:
            self.send(StageFailed(self.job.stream_id, None, kind, message))
        except (EOFError, OSError):
            pass  # the parent is gone: the watch thread ends this process

    def produce(self, arena: Arena) -> None:
        job = self.job
        free_slots = deque(job.input_slots)
        source = read_batches(
            job.report,
            job.chunk_size,
            job.min_batch_rows,
            input_bytes(arena.slot_bytes),
            self._connected,
            self.spare,
            head_first=True,  # someone waits for a stream's first chunk
        )
        try:
            self.send(SourceOpened(job.stream_id, source.columns, source.total_rows))
            seq = first_chunk = 0
            first_row = start = job.report.source.first_row  # the cache's units: not 0
            for part in source.batches:
                while not free_slots:
                    free_slots.append(self._wait_for_credit())
                slot = free_slots.popleft()
                nbytes = arena.write_batch(slot, part)
                if nbytes is None:  # one row bigger than a slot: send it through the pipe
                    free_slots.appendleft(slot)
                    inline = _ipc_bytes(part)
                    produced = BatchProduced(
                        job.stream_id,
                        seq,
                        first_row,
                        first_chunk,
                        part.num_rows,
                        None,
                        len(inline),
                        inline,
                    )
                else:
                    produced = BatchProduced(
                        job.stream_id, seq, first_row, first_chunk, part.num_rows, slot, nbytes
                    )
                self.send(produced)
                seq += 1
                first_row += part.num_rows
                self.rows_sent = first_row
                first_chunk += -(-part.num_rows // job.chunk_size)
            self.send(SourceDone(job.stream_id, seq, first_row - start))
        finally:
            source.close()  # also when the stream stopped before its first batch
        logger.debug("stream %s: %d rows in %d batches read", job.stream_id, first_row - start, seq)

    def _connected(self, connection: Any) -> None:
        self.connection = connection
        if self.stopped.is_set():
            raise _Stopped

    def _wait_for_credit(self) -> int:
        slot = self.credits.get()
        if slot is None or self.stopped.is_set():
            raise _Stopped
        return slot


def run_producer(params: ChildParams, conn: Connection) -> None:
    """Process entry point: produce the streams the parent hands over until STOP.

    Runs in a producer process, started with the pool and kept, so that a stream's
    first chunk never waits for a process start or imports. With ``params.profile_dir``
    its allocations are recorded with memray.
    """
    send_lock = threading.Lock()

    def send(message: object) -> None:
        with send_lock:  # one pipe, many threads
            conn.send(message)

    run_child(params, send, lambda: _serve(conn, send))


def _serve(conn: Connection, send: Callable[[object], None]) -> None:
    # Import while idle, not on a stream's clock (~0.3 s of CPU). Safe here: this
    # process never forks. One in-memory connection is kept at hand for the next stream
    # (connecting costs ~15 ms, half a warm stream's first chunk). The next one is made
    # at the following message (a slot credit: the first batch is through), or after
    # SPARE_AFTER_IDLE_S without one (a short stream is read to its end before any
    # credit comes). An idle one holds DuckDB's threads, which sleep.
    import duckdb  # noqa: F401
    import pyarrow._parquet  # noqa: F401

    spare = _spare_connection()
    jobs: dict[str, _Job] = {}
    send(READY)
    try:
        wait_for_idle = True  # to make the spare when no message comes
        while True:
            if spare is None and wait_for_idle and not conn.poll(SPARE_AFTER_IDLE_S):
                spare = _spare_connection()
                wait_for_idle = spare is not None  # if it failed, retry at the next message
                continue
            message = conn.recv()
            wait_for_idle = True
            if message == STOP:
                return
            for stream_id in [i for i, j in jobs.items() if not j.thread.is_alive()]:
                del jobs[stream_id]
            if isinstance(message, ProducerJob):
                job = _Job(message, send, spare)  # a database file is attached to it
                jobs[message.stream_id] = job
                job.thread.start()
                spare = None
                continue
            if isinstance(message, SlotCredit) and message.stream_id in jobs:
                jobs[message.stream_id].credits.put(message.slot)
            elif isinstance(message, StopStream) and message.stream_id in jobs:
                jobs.pop(message.stream_id).stop()
            if spare is None:
                spare = _spare_connection()
    finally:
        for job in jobs.values():
            job.stop()
        for job in jobs.values():
            job.thread.join(1.0)
        if spare is not None:
            spare.close()
        conn.close()


def _ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _spare_connection() -> Any:
    """A fresh in-memory DuckDB connection, or None if one cannot be made now (the
    stream then connects for itself, and reports what fails)."""
    import duckdb

    try:
        return duckdb.connect()
    except Exception:
        return None


def _is_pipe_error(exc: BaseException) -> bool:
    """The pipe to the parent broke: the parent died or closed the pool."""
    return isinstance(exc, EOFError | BrokenPipeError | ConnectionResetError)
