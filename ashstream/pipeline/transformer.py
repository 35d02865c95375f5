"""The transformer process: Arrow batch in a slot → Typst row text in another slot.

Transformers are persistent and shared by every stream of a pool; each maps a stream's
arena on its first task and unmaps it when the parent says the stream is over.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection

import pyarrow as pa

from ashstream.aggregate import analyse_batch
from ashstream.encode import EncodeOptions, EncodeStats, encode_rows_text
from ashstream.errors import AshstreamError
from ashstream.pipeline.comms import READY, STOP, ReleaseArena, StageFailed, Task, TaskDone
from ashstream.pipeline.logs import forward_logs
from ashstream.profiling import tracked
from ashstream.shm import Arena

logger = logging.getLogger(__name__)

# A seam for testing, read once per process: a transformer given a batch that holds this
# row kills itself with SIGKILL, as an out-of-memory kill or a crash in native code would.
CRASH_AT_ROW_ENV = "ASHSTREAM_TEST_CRASH_AT_ROW"


def run_worker(
    worker_id: int,
    conn: Connection,
    profile_dir: str | None = None,
    generation: int = 0,
    log_level: int = logging.WARNING,
) -> None:
    """Process entry point: serve tasks until STOP or the parent goes away.

    Runs in a transformer process; ignores SIGINT so that only the parent decides. With
    ``profile_dir`` its allocations are recorded with memray (``ashstream.profiling``).
    """
    forward_logs(conn.send, f"transformer{worker_id}", log_level)
    with tracked(profile_dir, f"transformer{worker_id}", generation):
        _serve(worker_id, conn)


def _serve(worker_id: int, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pa.set_cpu_count(1)  # one process per core already; no nested thread pools
    arenas: dict[str, Arena] = {}
    options: dict[str, EncodeOptions] = {}
    crash_at_row = int(os.environ.get(CRASH_AT_ROW_ENV, "-1"))
    conn.send(READY)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break
            if message == STOP:
                break
            if isinstance(message, ReleaseArena):
                arena = arenas.pop(message.name, None)
                if arena is not None:
                    arena.close()
            elif isinstance(message, Task):
                if message.first_row <= crash_at_row < message.first_row + message.rows:
                    os.kill(os.getpid(), signal.SIGKILL)
                conn.send(_run_task(message, arenas, options))
    finally:
        for arena in arenas.values():
            arena.close()


def _run_task(task: Task, arenas: dict[str, Arena], options: dict[str, EncodeOptions]):
    try:
        arena = arenas.get(task.arena.name)
        if arena is None:
            arena = arenas[task.arena.name] = Arena.attach(
                task.arena.name, task.arena.slot_bytes, task.arena.slots
            )
        if task.inline is not None:
            batch = pa.ipc.open_stream(pa.py_buffer(task.inline)).read_next_batch()
        else:
            batch = arena.read_batch(task.in_slot, task.in_nbytes)
        partial = None
        if task.analysis is not None:
            partial = analyse_batch(batch, task.analysis, task.first_row)
            if task.analysis.hidden:
                batch = batch.drop_columns(list(task.analysis.hidden))
        if task.timezone not in options:
            options[task.timezone] = EncodeOptions(timezone=task.timezone)
        stats = EncodeStats()
        started = time.perf_counter()
        text, row_ends = encode_rows_text(batch, options=options[task.timezone], stats=stats)
        logger.debug(
            "stream %s batch %d: %d rows encoded in %.1f ms",
            task.stream_id,
            task.seq,
            batch.num_rows,
            (time.perf_counter() - started) * 1000,
        )
        rows = batch.num_rows
        del batch  # no view of the slot may outlive the task
        chunk_ends = tuple(
            int(row_ends[min(end, rows) - 1])
            for end in range(task.chunk_size, rows + task.chunk_size, task.chunk_size)
        )
        lossy = tuple((column, reason, n) for (column, reason), n in stats.counts.items())
        inline = None if arena.write_bytes(task.out_slot, text) else text.to_pybytes()
        return TaskDone(
            task.stream_id,
            task.seq,
            rows,
            task.out_slot,
            len(text),
            chunk_ends,
            lossy,
            inline,
            partial,
        )
    except AshstreamError as exc:
        return StageFailed(task.stream_id, task.seq, type(exc).__name__, str(exc))
    except Exception as exc:
        detail = "".join(traceback.format_exception(exc))
        return StageFailed(
            task.stream_id, task.seq, "PipelineError", f"transformer failed: {detail}"
        )
