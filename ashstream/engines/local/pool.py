"""The public engine: ``StreamPool`` and the ordered iterator of ``Chunk``s it yields."""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterator, Mapping
from typing import Any

import psutil

from ashstream.analysis.aggregate import Summary
from ashstream.batch_job import DEFAULT_SLOT_BYTES, MIN_BATCH_ROWS
from ashstream.chunks import Chunk, OrderedMerge, check_chunk_size, unshared_memory_bytes
from ashstream.encode import EncodeStats
from ashstream.engines import Pool
from ashstream.engines.local.health import HEALTH_INTERVAL_S, STALL_TIMEOUT_S, HealthLoop
from ashstream.engines.local.scheduling import (
    CALLER_WAIT_S,
    CRITICAL_FRACTION,
    MAX_RESTARTS,
    PAUSE_TIMEOUT_S,
    RESTART_WINDOW_S,
)
from ashstream.engines.local.streams import StreamState
from ashstream.engines.local.supervisor import Supervisor, default_workers
from ashstream.errors import AshstreamError, PipelineError, ResourceError
from ashstream.report import Report, parse_size, with_params

__all__ = ["Chunk", "StreamHandle", "StreamPool", "Summary"]


logger = logging.getLogger(__name__)

# What one pool of the local engine may ask of the machine: see _workers_the_machine_holds.
WORKERS_PER_CORE = 4
WORKER_MEMORY_BYTES = 64 * 2**20  # a transformer encoding a batch (idle: ~10 MiB)
# Open files of the parent, measured: a pool of 1 worker ran in 24, of 4 in 32 (the
# parent's pipes and sentinel of each child: 3); the rest is DuckDB's and the outputs'.
POOL_OPEN_FILES = 32
WORKER_OPEN_FILES = 4


class StreamHandle:
    """One running stream: iterate it for its chunks in source order.

    Leaving the loop early, closing the iterator or :meth:`cancel` stops the stream's
    reading and frees its shared memory.
    """

    def __init__(self, pool: StreamPool, state: StreamState) -> None:
        self._pool = pool
        self._state = state
        self.id = state.id
        self.report = state.report

    @property
    def columns(self) -> tuple[str, ...] | None:
        return self._state.columns

    @property
    def total_rows(self) -> int | None:
        """Rows the stream will yield, when the source says so cheaply; else None."""
        return self._state.total_rows

    @property
    def skipped(self) -> list[tuple[int, int]]:
        """Row ranges (first, last) left out under ``poison_policy="skip"``."""
        return list(self._state.skipped)

    @property
    def lossy(self) -> EncodeStats:
        """The values not represented exactly so far."""
        return self._state.merge.lossy

    @property
    def summary(self) -> Summary:
        """Report totals, charts and the groups that closed at the end of the stream.

        Raises:
            PipelineError: the stream has not delivered its last chunk yet.
        """
        state = self._state
        if state.status != "completed":
            raise PipelineError(
                f"stream {self.id} is {state.status}; its summary exists once every chunk "
                "has been taken"
            )
        return state.merge.summary

    def use_merge(self, merge: OrderedMerge) -> None:
        """Merge the stream's batches with ``merge`` (the cache's); before iterating."""
        self._state.merge = merge

    def __iter__(self) -> Iterator[Chunk]:
        return self._chunks()

    def _chunks(self) -> Iterator[Chunk]:
        status = "cancelled"
        try:
            while True:
                chunk = self._pool._supervisor.next_chunk(self._state)
                if chunk is None:
                    status = "completed"
                    return
                yield chunk
                del chunk  # held while the next is taken, it would be copied (Chunk.detach)
        except AshstreamError:
            status = "failed"
            raise
        finally:
            self._pool._supervisor.close_stream(self._state, status)

    def cancel(self) -> None:
        self._pool._supervisor.close_stream(self._state, "cancelled")


class StreamPool(Pool):
    """Producer and transformer processes, started once and shared by every stream.

    Use it as a context manager, under ``if __name__ == "__main__":`` in a script (the
    processes re-import the main script; opening a pool outside that guard is refused
    with a clear error)::

        if __name__ == "__main__":
            with StreamPool() as pool:
                for chunk in pool.stream("report.yaml"):
                    sink.write(chunk.text)

    Args:
        workers: transformer processes; default one per available core.
        slot_bytes: size of each shared-memory slot (8 MiB). A batch is cut to fit a
            quarter of one; a row, or a batch's text, bigger than a slot travels whole
            through the child's pipe instead.
        start_method: ``"forkserver"`` (default) or ``"spawn"``; never ``"fork"``, which
            is unsafe once DuckDB or Arrow have started threads.
        max_restarts, restart_window_s: restart intensity. A dead transformer is replaced
            and its batches are dispatched again (a dead producer fails its unfinished
            streams and is replaced); more than ``max_restarts`` deaths of either within
            ``restart_window_s`` fail every stream and the pool refuses new ones. A child
            that dies while the pool starts counts too: past the budget, opening the pool
            raises :class:`WorkerCrashed` naming it.
        poison_policy: a batch that has killed 3 transformers fails its stream
            (``"fail"``, naming its rows) or is left out and reported in
            ``StreamHandle.skipped`` (``"skip"``).
        memory_limit: bytes or a size such as ``"2GiB"`` for the whole process tree;
            default the cgroup's limit, else the machine's RAM. A report's
            ``pipeline.memory_limit`` applies while it runs, when lower. See
            :mod:`ashstream.engines.local.health` for the breaker.
        pause_timeout_s: memory that stays critical this long although new batches
            were paused fails the streams with a ``ResourceError``.
        health_interval_s: how often the health loop measures.
        stall_timeout_s: a stream with no progress this long fails instead of hanging.
        profile_dir: record every child process's allocations with memray into this
            folder (see :mod:`ashstream.profiling`; call ``profiling.prepare`` first).
        min_batch_rows: rows read and encoded together at least (a batch is then cut
            into chunks); lower costs throughput, as each batch has a fixed cost.
        max_reading_streams: streams whose sources are open at once (default two per
            worker), as each open source holds tens of MB of DuckDB's state. A stream
            started beyond it waits, ``queued``, until one of them has read its source
            or failed, or until every one of them has waited on its caller:
            ``caller_wait_s`` (half a second), or a twentieth of a second when the
            queued stream's own caller is waiting for it (one thread reading several
            streams in turn), so that the queue never deadlocks a caller. A soft limit,
            then: slow callers let more streams read.
    """

    engine = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        start_method: str = "forkserver",
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
        poison_policy: str = "fail",
        memory_limit: int | str | None = None,
        pause_timeout_s: float = PAUSE_TIMEOUT_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        profile_dir: str | None = None,
        min_batch_rows: int = MIN_BATCH_ROWS,
        max_reading_streams: int | None = None,
        caller_wait_s: float = CALLER_WAIT_S,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if max_reading_streams is not None and max_reading_streams < 1:
            raise ValueError(f"max_reading_streams must be at least 1, got {max_reading_streams}")
        if min_batch_rows < 1:
            raise ValueError(f"min_batch_rows must be at least 1, got {min_batch_rows}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
        self.workers = _workers_the_machine_holds(workers or default_workers())
        if poison_policy not in ("fail", "skip"):
            raise ValueError(f"poison_policy must be 'fail' or 'skip', not {poison_policy!r}")
        self._supervisor = Supervisor(
            self.workers,
            slot_bytes,
            start_method,
            max_restarts,
            restart_window_s,
            poison_policy,
            profile_dir,
            min_batch_rows,
            max_reading_streams,
            caller_wait_s,
        )
        self._health = HealthLoop(
            self._supervisor,
            health_interval_s,
            parse_size(memory_limit, "memory_limit") if memory_limit is not None else None,
            pause_timeout_s,
            stall_timeout_s,
        )
        self._open = False
        self._closed = False  # processes and threads are started once per pool

    def open(self) -> None:
        if self._closed:
            raise PipelineError("this StreamPool was closed; start a new one")
        if not self._open:
            self._open = True
            try:
                self._supervisor.open()
            except BaseException:
                self.close()
                raise
            self._health.start()

    def close(self) -> None:
        """Cancel running streams, stop every process, unlink every segment."""
        if self._open:
            self._open, self._closed = False, True
            self._health.stop()
            self._supervisor.close()

    def start(
        self,
        report: Report | str | os.PathLike,
        chunk_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> StreamHandle:
        """Start streaming ``report`` (a :class:`Report` or the path of its YAML file)."""
        if not self._open:
            self.open()
        report = with_params(report, params)
        chunk_size = check_chunk_size(chunk_size or report.pipeline.chunk_size)
        limit = report.pipeline.memory_limit
        idle = unshared_memory_bytes(children=True) if limit is not None else 0
        if limit is not None and idle >= CRITICAL_FRACTION * limit:
            # the breaker would pause for nothing to drain, and fail only after its timeout
            raise ResourceError(
                f"{report.path}: pipeline.memory_limit: {limit / 2**20:,.0f} MiB is less than "
                f"this pool of {self.workers} workers uses idle "
                f"({idle / 2**20:,.0f} MiB); raise it, or use fewer workers"
            )
        return StreamHandle(self, self._supervisor.start_stream(report, chunk_size))

    def status(self, stream_id: str) -> dict[str, Any] | None:
        """The registry entry of a stream: status, rows, chunks, pids, error, times."""
        self._supervisor.publish()
        return self._supervisor.registry.get(stream_id)

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        self._supervisor.publish()
        return self._supervisor.registry.list(status)

    def cancel(self, stream_id: str) -> None:
        for state in self._supervisor.streams():
            if state.id == stream_id:
                self._supervisor.close_stream(state, "cancelled")

    @property
    def memory_bytes(self) -> int:
        """Memory of the whole process tree at the last health check."""
        return self._health.memory_bytes

    @property
    def peak_memory_bytes(self) -> int:
        return self._health.peak_memory_bytes

    @property
    def memory_limit(self) -> int:
        """The memory limit in force now, in bytes."""
        return self._health.memory_limit()

    @property
    def restarts(self) -> int:
        """Child processes (transformers, producers) that died since the pool started."""
        return self._supervisor.budget.total

    def busy_transformers(self) -> int:
        """Transformer processes working on a batch now."""
        return self._supervisor.busy_transformers()

    def transformer_pids(self) -> list[int]:
        return self._supervisor.transformer_pids()


def _workers_the_machine_holds(asked: int) -> int:
    """``asked``, or fewer, with a warning, when the machine cannot hold that many:
    more than WORKERS_PER_CORE a core only queue for the CPU, each needs some memory
    while it encodes, and each holds a few of the parent's open files.

    Raises:
        ResourceError: the open-file limit leaves no room for a pool at all.
    """
    cores = len(os.sched_getaffinity(0))
    available = psutil.virtual_memory().available
    by_memory = available // WORKER_MEMORY_BYTES
    files = _open_file_limit()
    by_files = (files - POOL_OPEN_FILES) // WORKER_OPEN_FILES
    if by_files < 1:
        raise ResourceError(
            f"the open-file limit (ulimit -n) is {files}; a pool needs at least "
            f"{POOL_OPEN_FILES + WORKER_OPEN_FILES}: raise it (ulimit -n 1024)"
        )
    held = max(1, min(asked, WORKERS_PER_CORE * cores, by_memory, by_files))
    if held < asked:
        logger.warning(
            "%d workers asked, but this machine holds %d (%d cores, %d MiB available, an "
            "open-file limit of %d); starting %d",
            asked,
            held,
            cores,
            available // 2**20,
            files,
            held,
        )
    return held


def _open_file_limit() -> int:
    """The soft limit on open files, first raised as far as the hard one allows (to
    at most 4096), as a process that starts others should."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 2**20
