"""The transformer process: Arrow batch in a slot → Typst row text in another slot.

Transformers are persistent and shared by every stream of a pool; each maps a stream's
arena on its first task and unmaps it when the parent says the stream is over.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import Connection

import pyarrow as pa

from ashstream.batch_job import batch_failure, encode_batch
from ashstream.encode import EncodeOptions
from ashstream.engines.local.child import ChildParams, Faults, run_child
from ashstream.engines.local.comms import READY, STOP, ReleaseArena, StageFailed, Task, TaskDone
from ashstream.engines.local.shm import Arena
from ashstream.errors import AshstreamError

logger = logging.getLogger(__name__)


def run_transformer(params: ChildParams, conn: Connection) -> None:
    """Process entry point: serve tasks until STOP or the parent goes away.

    Runs in a transformer process. With ``params.profile_dir`` its allocations are
    recorded with memray (``ashstream.profiling``).
    """
    run_child(params, conn.send, lambda: _serve(conn, params.faults))


def _serve(conn: Connection, faults: Faults) -> None:
    pa.set_cpu_count(1)  # one process per core already; no nested thread pools
    arenas: dict[str, Arena] = {}
    options: dict[str, EncodeOptions] = {}
    conn.send(READY)
    try:
        while True:
            message = conn.recv()
            if message == STOP:
                break
            if isinstance(message, ReleaseArena):
                arena = arenas.pop(message.name, None)
                if arena is not None:
                    arena.close()
            elif isinstance(message, Task):
                if _holds(message, faults.crash_at_row):
                    os.kill(os.getpid(), signal.SIGKILL)
                conn.send(_run_task(message, arenas, options, _holds(message, faults.fail_at_row)))
    finally:
        for arena in arenas.values():
            arena.close()


def _holds(task: Task, row: int) -> bool:
    return task.first_row <= row < task.first_row + task.rows


def _run_task(
    task: Task, arenas: dict[str, Arena], options: dict[str, EncodeOptions], fail: bool = False
) -> TaskDone | StageFailed:
    try:
        if fail:
            raise RuntimeError("a failure injected by a test")
        arena = arenas.get(task.arena.name)
        if arena is None:
            arena = arenas[task.arena.name] = Arena.attach(
                task.arena.name, task.arena.slot_bytes, task.arena.slots
            )
        if task.inline is not None:
            batch = pa.ipc.open_stream(pa.py_buffer(task.inline)).read_next_batch()
        else:
            batch = arena.read_batch(task.in_slot, task.in_nbytes)
        if task.timezone not in options:
            options[task.timezone] = EncodeOptions(timezone=task.timezone)
        started = time.perf_counter()
        done = encode_batch(
            batch, task.first_row, task.chunk_size, options[task.timezone], task.analysis
        )
        del batch  # no view of the slot may outlive the task
        logger.debug(
            "stream %s batch %d: %d rows encoded in %.1f ms",
            task.stream_id,
            task.seq,
            done.rows,
            (time.perf_counter() - started) * 1000,
        )
        inline = None if arena.write_bytes(task.out_slot, done.text) else done.text.to_pybytes()
        return TaskDone(
            task.stream_id,
            task.seq,
            done.rows,
            task.out_slot,
            len(done.text),
            done.chunk_ends,
            done.lossy,
            inline,
            done.partial,
            done.mark,
            done.text_crc,
        )
    except Exception as exc:
        if not isinstance(exc, AshstreamError):
            logger.debug("transformer failed on batch %d", task.seq, exc_info=True)
        error = batch_failure(exc, task.first_row, task.rows, task.seq)
        return StageFailed(task.stream_id, task.seq, type(error).__name__, str(error))
