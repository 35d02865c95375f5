"""The producer process: source → Arrow IPC in shared-memory slots → descriptors to the parent.

One producer runs per stream. It writes a batch only into a slot the parent credited to
it, so it can never run further ahead of the transformers than the arena allows.
"""

from __future__ import annotations

import signal
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pyarrow as pa

from ashstream.errors import AshstreamError
from ashstream.pipeline.comms import (
    READY,
    STOP,
    BatchReady,
    ProducerJob,
    SlotCredit,
    SourceDone,
    SourceOpened,
    StageFailed,
)
from ashstream.shm import Arena, ipc_size
from ashstream.sources import open_source

# Rows read and encoded together at least, whatever the chunk size: a transformer call
# costs about 1 ms of fixed overhead, so 1000-row chunks encoded one by one would run at
# half speed. The caller still gets chunks of at most chunk_size rows.
MIN_BATCH_ROWS = 16384
# An input batch may fill this share of a slot (1/4): Typst text is usually 2-4x the Arrow
# size, and the result must fit a slot of the same size to avoid the slow inline path.
INPUT_SHARE_OF_SLOT = 4


class _Stopped(Exception):
    """The parent asked this producer to stop."""


def run_producer(conn: Connection) -> None:
    """Process entry point: serve streams one at a time until STOP. Runs in a producer.

    The process is started ahead of need, with its imports done, so a stream's first
    chunk does not wait for a process start; after a stream that ended normally the
    parent may hand it the next one. After a failure or a stop it exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent decides what Ctrl-C means
    # Import while idle, not on the stream's clock (~0.3 s of CPU). Safe here: this
    # process never forks, and DuckDB's threads start only with a connection.
    import duckdb  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    conn.send(READY)
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:
                return
            if job == STOP:
                return
            if isinstance(job, ProducerJob) and not _run_job(conn, job):
                return
            # anything else is a credit the last stream no longer needed
    finally:
        conn.close()


def _run_job(conn: Connection, job: ProducerJob) -> bool:
    """Stream one job; True when it reached the end of its source."""
    arena = Arena.attach(job.arena.name, job.arena.slot_bytes, job.arena.slots)
    try:
        _produce(conn, job, arena)
        return True
    except _Stopped:
        return False
    except AshstreamError as exc:
        conn.send(StageFailed(job.stream_id, None, type(exc).__name__, str(exc)))
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc))
        conn.send(StageFailed(job.stream_id, None, "PipelineError", f"producer failed: {detail}"))
    finally:
        arena.close()
    return False


def _produce(conn: Connection, job: ProducerJob, arena: Arena) -> None:
    free_slots = deque(job.input_slots)
    source = open_source(job.report, max(job.chunk_size, MIN_BATCH_ROWS))
    conn.send(SourceOpened(tuple(source.schema.names), source.total_rows))
    seq = first_row = first_chunk = 0
    for batch in _first_chunk_alone(source.batches, job.chunk_size):
        for part in split_to_fit(batch, arena.slot_bytes // INPUT_SHARE_OF_SLOT):
            while not free_slots:
                free_slots.append(_wait_for_credit(conn))
            slot = free_slots.popleft()
            nbytes = arena.write_batch(slot, part)
            if nbytes is None:  # one row bigger than a slot: send it through the pipe
                free_slots.appendleft(slot)
                inline = _ipc_bytes(part)
                ready = BatchReady(
                    seq, first_row, first_chunk, part.num_rows, None, len(inline), inline
                )
            else:
                ready = BatchReady(seq, first_row, first_chunk, part.num_rows, slot, nbytes)
            conn.send(ready)
            seq += 1
            first_row += part.num_rows
            first_chunk += -(-part.num_rows // job.chunk_size)
    conn.send(SourceDone(seq, first_row))


def _first_chunk_alone(batches: Iterator[pa.RecordBatch], chunk_size: int):
    """The first chunk travels as a batch of its own, so that the caller sees it after
    encoding chunk_size rows rather than MIN_BATCH_ROWS."""
    for i, batch in enumerate(batches):
        if i == 0 and batch.num_rows > chunk_size:
            yield batch.slice(0, chunk_size)
            batch = batch.slice(chunk_size)
        yield batch


def _wait_for_credit(conn: Connection) -> int:
    message = conn.recv()
    if isinstance(message, SlotCredit):
        return message.slot
    raise _Stopped  # STOP, or anything unexpected


def split_to_fit(batch: pa.RecordBatch, slot_bytes: int) -> list[pa.RecordBatch]:
    """Row ranges of ``batch`` whose IPC form fits a slot (a single row always passes)."""
    size = ipc_size(batch)
    if size <= slot_bytes or batch.num_rows <= 1:
        return [batch]
    rows = max(1, int(batch.num_rows * slot_bytes / size * 0.9))
    parts = []
    for start in range(0, batch.num_rows, rows):
        parts += split_to_fit(batch.slice(start, rows), slot_bytes)
    return parts


def _ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


__all__ = ["STOP", "run_producer", "split_to_fit"]
