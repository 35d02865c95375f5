"""The producer process: source → Arrow IPC in shared-memory slots → descriptors to the parent.

One producer runs per stream. It writes a batch only into a slot the parent credited to
it, so it can never run further ahead of the transformers than the arena allows.
"""

from __future__ import annotations

import signal
import traceback
from collections import deque
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


class _Stopped(Exception):
    """The parent asked this producer to stop."""


def run_producer(conn: Connection) -> None:
    """Process entry point: wait for one job, stream it, exit. Runs in a producer process.

    The process is started ahead of need (imports done) so a stream's first chunk does
    not wait for a process start.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent decides what Ctrl-C means
    conn.send(READY)
    try:
        job = conn.recv()
    except EOFError:
        return
    if not isinstance(job, ProducerJob):
        return
    arena = Arena.attach(job.arena.name, job.arena.slot_bytes, job.arena.slots)
    try:
        _produce(conn, job, arena)
    except _Stopped:
        pass
    except AshstreamError as exc:
        conn.send(StageFailed(job.stream_id, None, type(exc).__name__, str(exc)))
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc))
        conn.send(StageFailed(job.stream_id, None, "PipelineError", f"producer failed: {detail}"))
    finally:
        arena.close()
        conn.close()


def _produce(conn: Connection, job: ProducerJob, arena: Arena) -> None:
    free_slots = deque(job.input_slots)
    source = open_source(job.report, job.chunk_size)
    conn.send(SourceOpened(tuple(source.schema.names), source.total_rows))
    seq = first_row = 0
    for batch in source.batches:
        for part in split_to_fit(batch, arena.slot_bytes):
            while not free_slots:
                free_slots.append(_wait_for_credit(conn))
            slot = free_slots.popleft()
            nbytes = arena.write_batch(slot, part)
            if nbytes is None:  # one row bigger than a slot: send it through the pipe
                free_slots.appendleft(slot)
                inline = _ipc_bytes(part)
                conn.send(BatchReady(seq, first_row, part.num_rows, None, len(inline), inline))
            else:
                conn.send(BatchReady(seq, first_row, part.num_rows, slot, nbytes))
            seq += 1
            first_row += part.num_rows
    conn.send(SourceDone(seq, first_row))


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
