"""The only module that starts, signals and joins processes; it runs the dispatcher.

::

    caller thread               dispatcher thread "ashstream-dispatch"     outbox threads      children
    -------------               ---------------------------------------     --------------      --------
                                BatchReady  -> stream.ready    <----------------pipe-------  producer
                                SlotCredit (input slot freed)  -> outbox ------pipe------->  (a thread a stream)
                                Task(seq, in slot, out slot)   -> outbox ------pipe------->  transformer 0..N-1
    next_chunk() <--condition-- TaskDone -> stream.results     <----------------pipe-------  (shared by all streams)
      reads the out slot, frees it, wakes the dispatcher

**Dispatcher.** One thread reads the parent's end of every pipe. It waits on the pipes,
on every child's sentinel (a dead child is noticed at once, not by polling) and on a
wake-up pipe the callers poke. It never writes to a pipe: each child has an
:class:`Outbox`, a queue drained by a thread of its own, as CPython's process pool feeds
its call queue. So the dispatcher never blocks while it holds the lock, a message may be
as large as memory allows (a row bigger than a slot travels inline), and a child busy
sending its own large result can always be read. An exception in the dispatcher breaks
the pool cleanly: every stream fails with an internal error, none waits forever.

**Slots and backpressure.** Each stream has an arena of ``2 * window`` slots: inputs and
results. The producer may write only into input slots it holds credit for; an input slot
comes back to it when its result is safe in a result slot. A result slot is given to a
batch at dispatch and freed when the caller has copied its text out. Batches are
dispatched in ``seq`` order per stream, so the oldest undelivered batch always holds a
result slot: the reorder window (``pipeline.collector``) is bounded by the arena and
cannot deadlock.

**Crashes.** A batch stays in its input slot until its result exists, so the tasks of a
transformer that dies are dispatched again (keeping their result slots) to a
replacement process; what becomes of a batch that keeps killing transformers, and how
many restarts the pool affords, is decided in ``pipeline.scheduling``. A producer that
dies fails the streams it had not finished and is replaced; re-reading a source from the
middle is not attempted, since a query without ORDER BY need not return its rows in the
same order twice. A child that dies while the pool starts is replaced under the same
restart budget, or the start fails naming it.

**Producers.** ``n_producers`` processes (one per ``PRODUCER_PER_TRANSFORMERS``
transformers) start with the pool and each serves many streams, one thread and DuckDB
connection per stream: a process costs ~50 MB once DuckDB is up, so memory does not
grow with the number of streams, and no stream waits for a process start.

**Parent death.** Every child watches the pool's lifeline pipe (``pipeline.child``) and
exits within moments of the pool's process, however that process ends.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from ashstream import errors, telemetry
from ashstream.analysis.aggregate import Analysis, ClosedGroup, Collector
from ashstream.batch_job import MIN_BATCH_ROWS
from ashstream.chunks import Chunk, cut_into_chunks
from ashstream.encode import EncodeStats
from ashstream.engines.local.child import ChildParams, Faults
from ashstream.engines.local.collector import ResultOrder
from ashstream.engines.local.comms import (
    READY,
    STOP,
    ArenaRef,
    BatchReady,
    LogLine,
    ProducerJob,
    ReleaseArena,
    SlotCredit,
    SourceDone,
    SourceOpened,
    StageFailed,
    StopStream,
    Task,
    TaskDone,
)
from ashstream.engines.local.main_guard import check_main_guard
from ashstream.engines.local.producer import run_producer
from ashstream.engines.local.registry import Registry
from ashstream.engines.local.scheduling import (
    MAX_BATCH_KILLS,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    LostBatch,
    RestartBudget,
    lost_batch_action,
    may_start_reading,
    reading_streams_limit,
    round_robin,
    stream_window,
    suspected,
)
from ashstream.engines.local.shm import Arena, new_pool_id, shm_free_text, sweep_stale_segments
from ashstream.engines.local.transformer import run_transformer
from ashstream.errors import (
    INTERNAL_ERROR_ADVICE,
    AshstreamError,
    Cancelled,
    PipelineError,
    WorkerCrashed,
)
from ashstream.report import Report
from ashstream.sources import sweep_stale_spill_dirs

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW_S", "Chunk", "StreamState", "Supervisor"]

logger = logging.getLogger(__name__)

# One producer process per this many transformers: a producer serves several streams on
# threads, so memory does not grow with the number of streams.
PRODUCER_PER_TRANSFORMERS = 4
# Tasks handed to one transformer before it finishes the first: 2 hides the round trip
# through the dispatcher without letting one slow transformer hoard batches.
TASKS_PER_TRANSFORMER = 2
# A reading stream whose finished results have waited this long for its caller counts as
# waiting on the caller (see scheduling.may_start_reading); shorter waits are the caller
# between two chunks, or a sink taking its time.
CALLER_WAIT_S = 0.5
# ... this long, when a queued stream's own caller is waiting for it: the caller may be
# reading the streams in turn, and nothing moves until the queued one starts.
CALLER_WAITS_FOR_QUEUED_S = 0.05
START_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 1.0
TRANSFORMER, PRODUCER = "transformer", "producer"
_ENTRY_POINTS = {TRANSFORMER: run_transformer, PRODUCER: run_producer}
_CLOSE = object()  # an Outbox's last message: its thread closes the pipe and ends


class Outbox:
    """Messages to one child, sent in order by a thread of their own, so that no other
    thread ever blocks on the child's pipe. The thread owns the sending side: it closes
    the connection once it is told to, never while it might still be writing to it."""

    def __init__(self, conn: Connection, name: str, on_error: Callable[[BaseException], None]):
        self._conn = conn
        self._on_error = on_error  # an unexpected failure (not a dead child) breaks the pool
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._feed, name=f"ashstream-send-{name}", daemon=True
        )
        self._thread.start()

    def put(self, message: object) -> None:
        """Never blocks."""
        self._queue.put(message)

    def close(self, timeout_s: float) -> None:
        """Send what is queued, then close the connection; wait up to ``timeout_s`` (0: do
        not wait) for that to happen."""
        self._queue.put(_CLOSE)
        if timeout_s != 0:
            self._thread.join(timeout_s)

    def _feed(self) -> None:
        try:
            while (message := self._queue.get()) is not _CLOSE:
                try:
                    self._conn.send(message)
                except OSError:
                    pass  # the child died: its sentinel tells the dispatcher, which replaces it
                except Exception as exc:
                    self._on_error(exc)
        finally:
            self._conn.close()


@dataclass
class _Child:
    """A transformer or a producer process, and the parent's ends of its pipe."""

    role: str  # TRANSFORMER or PRODUCER
    index: int  # its slot number 0..N-1, kept across restarts
    process: BaseProcess
    conn: Connection  # read by the dispatcher only
    outbox: Outbox  # everything sent to the child goes through here
    generation: int = 0  # restarts of this slot, for naming profiles
    ready: bool = False
    tasks: list[tuple[str, int]] = field(default_factory=list)  # (stream id, seq), in flight
    streams: set[str] = field(default_factory=set)  # producers: the streams it serves

    def adopt(self, replacement: _Child) -> None:
        """Take over a new process in this slot; streams keep pointing at this object."""
        self.process, self.conn, self.outbox = (
            replacement.process,
            replacement.conn,
            replacement.outbox,
        )
        self.generation = replacement.generation
        self.ready, self.tasks, self.streams = False, [], set()

    def describe(self) -> str:
        return f"{self.role} {self.index} (pid {self.process.pid})"


def describe_exit(code: int | None) -> str:
    """``killed by SIGKILL`` or ``exit code 1``, as an operator would look it up."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def death_hint(code: int | None) -> str:
    """What a user can do about a child that died with ``code``. SIGBUS is a write
    to shared memory that /dev/shm had no room for (a tmpfs that filled after the
    arena was made); other deaths are most often the kernel's out-of-memory killer."""
    if code == -signal.SIGBUS:
        return (
            f"a write to shared memory failed: {shm_free_text()}; give it more room "
            "(docker run --shm-size=1g) or use fewer workers"
        )
    return "if the system was out of memory, lower chunk_size or the number of workers"


class StreamState:
    """Everything the parent knows about one stream. Guarded by the supervisor's lock."""

    def __init__(self, stream_id: str, report: Report, chunk_size: int, arena: Arena, window: int):
        self.id = stream_id
        self.report = report
        self.chunk_size = chunk_size
        self.analysis = Analysis.of(report)
        self.collector = Collector(self.analysis) if self.analysis is not None else None
        self.final_groups: list[ClosedGroup] = []  # those open at the end, once it came
        self.arena = arena
        self.arena_ref = ArenaRef(arena.name, arena.slot_bytes, arena.slots)
        self.input_slots = tuple(range(window))
        self.result_free: deque[int] = deque(range(window, 2 * window))
        self.producer: _Child | None = None  # the producer process serving it
        self.source_done = False
        self.ready: deque[BatchReady] = deque()  # produced, not dispatched, in seq order
        self.retry: deque[tuple[BatchReady, int]] = deque()  # a dead transformer's batches
        self.in_flight: dict[int, tuple[BatchReady, int]] = {}  # seq -> (batch, out slot)
        self.kills: dict[int, int] = {}  # seq -> transformers that died running it
        self.results = ResultOrder()  # encoded batches, until the caller takes them
        self.pending: deque[Chunk] = deque()  # chunks of a taken batch, not yet yielded
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.rows = 0
        self.chunks = 0
        self.bytes = 0
        self.restarts = 0  # deaths of the pool's children while this stream ran
        self.redispatched = 0  # its batches dispatched again after a transformer died
        self.skipped: list[tuple[int, int]] = []  # row ranges left out (poison_policy="skip")
        self.lossy = EncodeStats()
        self.error: AshstreamError | None = None
        self.status = "starting"
        self.started_at = time.time()
        self.last_progress = time.monotonic()  # a batch read, encoded or taken by the caller
        self.finished_at: float | None = None
        self.closing = False
        self.released = threading.Event()
        self.caller_waits = False  # its caller waits in next_chunk (read while queued)

    def reads_on_producer(self) -> bool:
        """Whether this stream counts against max_reading_streams: a producer has its
        source open, until it is read to the end, fails or is closed."""
        return self.producer is not None and self.id in self.producer.streams and not self.closing

    def waits_on_caller(self, since: float) -> bool:
        """Whether every result slot has held a finished batch for the caller since
        ``since`` (monotonic): the stream can do nothing until its caller takes one."""
        return (
            not self.result_free
            and not self.in_flight
            and not self.retry
            and self.last_progress < since
        )

    def registry_entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "report": self.report.name,
            "status": self.status,
            "rows": self.rows,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "total_rows": self.total_rows,
            "rows_per_s": self.rows
            / max((self.finished_at or time.time()) - self.started_at, 1e-9),
            "restarts": self.restarts,
            "redispatched": self.redispatched,
            "skipped": list(self.skipped),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "pids": {"producer": self.producer.process.pid if self.producer else None},
            "error": str(self.error) if self.error else None,
        }


class Supervisor:
    """Owns the transformer processes, the producers, the arenas and the dispatcher."""

    def __init__(
        self,
        workers: int,
        slot_bytes: int,
        start_method: str,
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
        poison_policy: str = "fail",
        profile_dir: str | None = None,
        min_batch_rows: int = MIN_BATCH_ROWS,
        max_reading_streams: int | None = None,
    ) -> None:
        self.ctx = mp.get_context(start_method)
        self.pool_id = new_pool_id()  # names its segments; children clean up by it
        self.min_batch_rows = min_batch_rows
        self.profile_dir = profile_dir  # memray captures of every child go here
        self.n_transformers = workers
        self.max_reading_streams = max_reading_streams or reading_streams_limit(workers)
        self.slot_bytes = slot_bytes
        self.poison_policy = poison_policy  # "fail" or "skip" a batch that kills 3 transformers
        self.broken: str | None = None  # why the pool gave up, once it has
        self.budget = RestartBudget(max_restarts, restart_window_s)  # child deaths afforded
        # The process tree's memory at the last health check, written by the health loop:
        # (RSS - shared plus the arenas once, cheap; PSS, exact and taken rarely).
        self.memory: tuple[int | None, int | None] = (None, None)
        self._lock = threading.Lock()
        # Held from reading a stream's entry to writing it to the registry, so that the
        # health loop's copy of a running stream never lands after its final state.
        self._publishing = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._streams: dict[str, StreamState] = {}
        # Streams opened while max_reading_streams others read, with their producer jobs,
        # in the order they came.
        self._queued: deque[tuple[StreamState, ProducerJob]] = deque()
        self._transformers: list[_Child] = []
        self.n_producers = max(1, -(-workers // PRODUCER_PER_TRANSFORMERS))
        self._producers: list[_Child] = []
        self._wake_r, self._wake_w = self.ctx.Pipe(duplex=False)
        # Written under the lock: never block on it (a 5-byte message is written whole
        # or not at all); a full pipe already wakes the dispatcher.
        os.set_blocking(self._wake_w.fileno(), False)
        # Only this process holds the write end; every child holds a read end and exits
        # when it reads EOF, that is when this process is gone (pipeline.child).
        self._lifeline_r, self._lifeline_w = self.ctx.Pipe(duplex=False)
        self._commands: deque = deque()  # run by the dispatcher, under the lock
        self._closing = False  # close() has begun: start no more processes
        self._paused = False  # admission of new batches paused by the memory breaker
        self._events: list[tuple[str, dict, dict]] = []  # emitted once the lock is released
        self._logs: list[LogLine] = []  # children's log lines, likewise
        self._stopping = False  # the dispatcher is to exit
        self._rr = itertools.count()  # round robin over streams
        self._thread: threading.Thread | None = None
        self.registry: Registry | None = None

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        check_main_guard()
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is not None and not os.path.exists(main_file):
            # spawn and forkserver children re-import the main script by path
            raise PipelineError(
                f"cannot start worker processes: the main script {main_file!r} is not a "
                "file (code read from stdin?). Save it to a file and run that."
            )
        sweep_stale_segments()
        sweep_stale_spill_dirs()
        if self.ctx.get_start_method() == "forkserver":
            _preload_in_forkserver()
        self.registry = Registry(self.ctx, self._lifeline_r, self.pool_id)
        # Appended one by one: if a start fails, close() stops the ones already started.
        for i in range(self.n_transformers):
            self._transformers.append(self._start_child(TRANSFORMER, i))
        for i in range(self.n_producers):
            self._producers.append(self._start_child(PRODUCER, i))
        self._await_ready()
        self._thread = threading.Thread(target=self._run, name="ashstream-dispatch", daemon=True)
        self._thread.start()

    def _await_ready(self) -> None:
        """Wait until every child has imported what it needs: no batch is read before.

        A child that dies meanwhile (a bad import, the out-of-memory killer) is seen by
        its sentinel and replaced under the restart budget, or the start fails."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting := [c for c in self._children() if not c.ready]:
            handles = {c.conn: c for c in waiting} | {c.process.sentinel: c for c in waiting}
            ready = wait(list(handles), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                names = ", ".join(c.describe() for c in waiting)
                raise PipelineError(
                    f"ashstream's processes did not start within {START_TIMEOUT_S:.0f} s "
                    f"({names} not ready); is the machine overloaded?"
                )
            for handle in ready:
                child = handles[handle]
                if handle is child.conn:
                    message = _recv(child.conn)  # READY or a log line
                    if message is not None:  # EOF: its sentinel follows
                        self._handle(child, message)
                elif handle == child.process.sentinel:
                    code = self._reap(child)
                    if not self.budget.record_death(time.monotonic()):
                        raise WorkerCrashed(
                            f"the {child.role} process {child.index} died while the pool "
                            f"was starting ({describe_exit(code)}); {self.budget.in_window} "
                            f"child processes died within {self.budget.window_s:.0f} s, so "
                            "ashstream cannot start. If the system is short of memory, use "
                            "fewer workers."
                        )
                    self._replace(child, code)
        self._emit_outside_lock()

    def close(self) -> None:
        """Cancel the streams, stop the dispatcher and every child, unlink every segment.

        Each stage runs even if one before it failed (a second Ctrl-C, say): a pool that
        closed must leave no process, thread or segment behind."""
        with self._lock:
            self._closing = True
            streams = list(self._streams.values())
        try:
            for stream in streams:
                self.close_stream(stream, "cancelled")
        finally:
            with self._lock:
                self._stopping = True
                self._wake()
            if self._thread is not None:
                self._thread.join(5)
            try:
                self._stop_children()
            finally:
                if self.registry is not None:
                    self.registry.close()
                for conn in (self._wake_r, self._wake_w, self._lifeline_r, self._lifeline_w):
                    conn.close()
        self._emit_outside_lock()

    def _stop_children(self) -> None:
        children, self._transformers, self._producers = self._children(), [], []
        for child in children:
            child.outbox.put(STOP)
        for child in children:
            _stop_process(child.process)
            child.outbox.close(JOIN_TIMEOUT_S)

    def _children(self) -> list[_Child]:
        return self._transformers + self._producers

    def _start_child(self, role: str, index: int, generation: int = 0) -> _Child:
        """Start a transformer or a producer; ``generation`` counts restarts of its slot."""
        params = ChildParams(
            role,
            index,
            generation,
            self.pool_id,
            self._lifeline_r,
            self.profile_dir,
            self._log_level(),
            Faults.from_environment(role, generation),
        )
        parent_end, child_end = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_ENTRY_POINTS[role],
            args=(params, child_end),
            name=f"ashstream-{role}-{index}",
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        outbox = Outbox(parent_end, f"{role}-{index}", self._internal_error)
        return _Child(role, index, process, parent_end, outbox, generation)

    def _replace(self, child: _Child, code: int | None) -> None:
        """A new process in a dead child's slot."""
        replacement = self._start_child(child.role, child.index, child.generation + 1)
        child.adopt(replacement)
        self._events.append(
            (
                "process.restarted",
                {"restarts_in_window": self.budget.in_window},
                {
                    "role": child.role,
                    "index": child.index,
                    "exit_code": code,
                    "pid": child.process.pid,
                },
            )
        )

    @staticmethod
    def _reap(child: _Child) -> int | None:
        """Join a child whose sentinel fired; its exit code. Its outbox's thread closes
        the pipe once it has given up on what was queued."""
        child.process.join(JOIN_TIMEOUT_S)
        # Not waited for: its thread may be failing a send, and an unexpected failure
        # there reports to _internal_error, which takes the lock the caller holds.
        child.outbox.close(timeout_s=0)
        return child.process.exitcode

    @staticmethod
    def _log_level() -> int:
        """Children log at the level the parent's ashstream logger would show."""
        return logging.getLogger("ashstream").getEffectiveLevel()

    def _relay_log(self, line: LogLine) -> None:
        """Under the lock: a child's log record, re-emitted once the lock is released."""
        self._logs.append(line)

    def _emit_outside_lock(self) -> None:
        """Telemetry events and children's log lines gathered under the lock."""
        with self._lock:
            events, self._events = self._events, []
            logs, self._logs = self._logs, []
        for event in events:
            telemetry.emit(*event)
        for line in logs:
            logging.getLogger(line.logger).log(
                line.level, "[%s pid %d] %s", line.role, line.pid, line.message
            )

    def transformer_pids(self) -> list[int]:
        with self._lock:
            return [t.process.pid for t in self._transformers]

    def busy_transformers(self) -> int:
        with self._lock:
            return sum(1 for t in self._transformers if t.tasks)

    # ------------------------------------------------------------------- streams

    def open_stream(self, report: Report, chunk_size: int) -> StreamState:
        self._check_open()
        with self._lock:
            window = stream_window(self.n_transformers, len(self._streams))
        arena = Arena.create(self.slot_bytes, 2 * window, self.pool_id)
        try:
            stream = StreamState(secrets.token_hex(4), report, chunk_size, arena, window)
            job = ProducerJob(
                stream.id,
                report,
                chunk_size,
                stream.arena_ref,
                stream.input_slots,
                self.min_batch_rows,
            )
            with self._lock:
                self._check_open()  # again: the pool may have broken or begun to close
                self._streams[stream.id] = stream
                stream.status = "queued"
                self._queued.append((stream, job))
                self._admit()
        except BaseException:
            arena.close()
            raise
        with self._publishing:  # never after the stream's final state
            with self._lock:
                entry = None if stream.closing else self._entry(stream)
            if entry is not None:
                self.registry.put(stream.id, entry)
        telemetry.emit("pipeline.started", {}, {"stream_id": stream.id, "report": report.name})
        return stream

    def _admit(self) -> None:
        """Under the lock: hand queued streams to a producer as scheduling.may_start_reading
        allows. Below the limit, in the order they came; past it, one at a time once every
        reader has waited on its caller: CALLER_WAITS_FOR_QUEUED_S when a queued stream's
        own caller waits for it (that one goes first), else CALLER_WAIT_S."""
        if self._closing:
            return  # close() cancels every stream, the queued ones too
        while self._queued:
            now = time.monotonic()
            reading = [s for s in self._streams.values() if s.reads_on_producer()]
            awaited = next((q for q in self._queued if q[0].caller_waits), None)
            patience = CALLER_WAIT_S if awaited is None else CALLER_WAITS_FOR_QUEUED_S
            if not may_start_reading(
                len(reading),
                self.max_reading_streams,
                all(s.waits_on_caller(now - patience) for s in reading),
            ):
                return
            if len(reading) >= self.max_reading_streams and awaited is not None:
                self._queued.remove(awaited)
                stream, job = awaited
            else:
                stream, job = self._queued.popleft()
            if stream.closing or stream.error is not None:
                continue
            producer = min(self._producers, key=lambda p: len(p.streams))
            producer.streams.add(stream.id)
            stream.producer = producer
            stream.status = "starting"
            stream.last_progress = now  # the queue's wait is not the stream's stall
            producer.outbox.put(job)

    def _check_open(self) -> None:
        if self.broken:
            raise PipelineError(f"the pool can run no more streams: {self.broken}")
        if self._closing:
            raise PipelineError("the pool is closing; start a new one")

    def next_chunk(self, stream: StreamState) -> Chunk | None:
        """The next chunk in source order, or None at the end. Runs in the caller's thread."""
        if stream.pending:
            return stream.pending.popleft()
        with self._cond:
            while True:
                if stream.error is not None:
                    raise stream.error
                if stream.closing:
                    raise Cancelled(f"stream {stream.id} was cancelled")
                if stream.results.next_ready():
                    batch, result = stream.results.take()
                    break
                if stream.results.finished():
                    if stream.collector is not None and not stream.final_groups:
                        stream.final_groups = stream.collector.finish()
                    return None
                if self._stopping:
                    raise PipelineError("the pool was closed while a stream was running")
                if stream.producer is None and not stream.caller_waits:
                    stream.caller_waits = True  # queued: its turn may come sooner
                    self._wake()
                self._cond.wait(0.5)
        closed = []
        if stream.collector is not None and result.partial is not None:
            closed = stream.collector.add(result.partial, batch.first_row)

        def read_text(start: int, end: int) -> bytes:
            # The slot stays this stream's until it is freed below: read without the lock.
            if result.inline is not None:
                return result.inline[start:end]
            try:
                return stream.arena.read_bytes(result.out_slot, end, start)
            except ValueError:  # the arena was closed: cancelled from another thread
                raise Cancelled(f"stream {stream.id} was cancelled") from None

        stream.pending.extend(
            cut_into_chunks(
                batch.first_row,
                batch.first_chunk,
                result.rows,
                result.chunk_ends,
                stream.chunk_size,
                read_text,
                closed,
            )
        )
        with self._cond:
            stream.result_free.append(result.out_slot)
            stream.last_progress = time.monotonic()
            stream.results.taken()
            stream.rows += result.rows
            stream.chunks += len(result.chunk_ends)
            stream.bytes += result.nbytes
            for column, reason, n in result.lossy:
                stream.lossy.add(column, reason, n)
            self._wake()
        return stream.pending.popleft() if stream.pending else self.next_chunk(stream)

    def close_stream(self, stream: StreamState, status: str) -> None:
        """Stop the stream's production, release its arena everywhere, record its status.

        Runs in the caller's thread; returns when nothing of the stream is left."""
        with self._lock:
            if stream.closing:
                return
            stream.closing = True
            if stream.error is None:
                stream.status = status
            stream.finished_at = time.time()
            self._commands.append(lambda: self._release(stream))
            self._wake()
            dispatcher_alive = self._thread is not None and self._thread.is_alive()
        if dispatcher_alive:
            stream.released.wait(5)
        stream.arena.close()
        with self._publishing:
            with self._lock:
                self._streams.pop(stream.id, None)
                entry = self._entry(stream)
            self.registry.put(stream.id, entry)
        self._emit_outside_lock()
        telemetry.emit(
            "pipeline.stopped",
            {
                "rows": stream.rows,
                "chunks": stream.chunks,
                "duration_s": stream.finished_at - stream.started_at,
            },
            {"stream_id": stream.id, "status": stream.status},
        )

    def _release(self, stream: StreamState) -> None:
        """Dispatcher side of close_stream: tell the children the stream is over."""
        self._queued = deque(queued for queued in self._queued if queued[0] is not stream)
        producer = stream.producer
        if producer is not None and stream.id in producer.streams:
            producer.streams.discard(stream.id)
            if not stream.source_done:
                producer.outbox.put(StopStream(stream.id))
        for transformer in self._transformers:
            transformer.outbox.put(ReleaseArena(stream.arena.name))
        stream.released.set()

    def publish(self) -> None:
        """Copy every running stream's counters to the registry (the health loop calls it)."""
        with self._publishing:
            with self._lock:
                entries = [self._entry(s) for s in self._streams.values() if not s.closing]
            for entry in entries:
                self.registry.put(entry["id"], entry)

    def _entry(self, stream: StreamState) -> dict[str, Any]:
        """The stream's registry entry, with what the pool knows of its processes."""
        entry = stream.registry_entry()
        entry["memory_bytes"], entry["memory_pss_bytes"] = self.memory
        entry["pids"]["transformers"] = [t.process.pid for t in self._transformers]
        return entry

    def pause_admission(self, paused: bool) -> None:
        """Stop (or restart) starting new batches; results keep draining."""
        with self._lock:
            self._paused = paused
            for stream in self._streams.values():
                if stream.status in ("running", "paused"):
                    stream.status = "paused" if paused else "running"
            self._wake()

    @property
    def paused(self) -> bool:
        return self._paused

    def fail(self, stream: StreamState, error: AshstreamError) -> None:
        with self._lock:
            self._fail(stream, error)
            self._cond.notify_all()
        self._emit_outside_lock()

    def fail_all(self, error: AshstreamError) -> None:
        for stream in self.streams():
            self.fail(stream, error)

    def stalled_streams(self, no_progress_since: float) -> list[StreamState]:
        """Streams with no progress since then, unless their caller has something to
        take (then the wait is the caller's). Paused streams count: a pause that never
        ends is a stall too."""
        with self._lock:
            return [
                s
                for s in self._streams.values()
                if s.error is None
                and not s.closing
                and s.producer is not None  # a queued stream waits its turn, not stalls
                and not s.pending  # chunks for the caller to take: the wait is its
                and not s.results.next_ready()  # likewise a batch
                and not s.results.finished()  # likewise the end
                and s.last_progress < no_progress_since
            ]

    def streams(self) -> list[StreamState]:
        with self._lock:
            return list(self._streams.values())

    # ---------------------------------------------------------------- dispatcher

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass  # closed (the pool is closing), or full (the dispatcher wakes anyway)

    def _run(self) -> None:
        try:
            while self._dispatch_once():
                pass
        except BaseException as exc:
            self._internal_error(exc)

    def _dispatch_once(self) -> bool:
        """One round: wait for messages, deaths or a wake-up, act on them; False once
        the dispatcher is to stop."""
        with self._lock:
            if self._stopping:
                return False
            conns = {child.conn: child for child in self._children()}
            sentinels = {child.process.sentinel: child for child in self._children()}
            # a queued stream's turn can come from the clock alone (see _admit)
            timeout = CALLER_WAITS_FOR_QUEUED_S / 2 if self._queued else 0.5
        ready = wait([self._wake_r, *conns, *sentinels], timeout=timeout)
        # Read without the lock: a large message takes a while, and a child stopped in
        # the middle of sending must not hold up the callers. Only this thread reads.
        received = [(conns[h], h, _recv(h)) for h in ready if h in conns]
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        with self._lock:
            for child, conn, message in received:
                if child.conn is conn and message is not None:  # EOF: its sentinel follows
                    self._handle(child, message)
            for handle in ready:
                child = sentinels.get(handle)
                if child is not None and child.process.sentinel == handle:
                    self._on_exit(child)
            while self._commands:
                self._commands.popleft()()
            self._admit()
            self._schedule()
            self._cond.notify_all()
        # handlers may call back into the pool: never emit under the lock
        self._emit_outside_lock()
        return True

    def _internal_error(self, exc: BaseException) -> None:
        """A bug in the parent's own machinery (the dispatcher, an outbox): break the
        pool cleanly. Every stream fails with an internal error, so no caller waits
        forever; close() still stops every process and unlinks every segment."""
        logger.debug("ashstream internal error", exc_info=exc)
        reason = (
            f"ashstream internal error, please report: {type(exc).__name__}: {exc}. "
            f"{INTERNAL_ERROR_ADVICE}"
        )
        with self._lock:
            self.broken = self.broken or reason
            for stream in self._streams.values():
                self._fail(stream, PipelineError(reason))
            self._cond.notify_all()
        self._emit_outside_lock()

    def _schedule(self) -> None:
        if self.broken or self._paused:
            return
        for transformer in sorted(self._transformers, key=lambda t: len(t.tasks)):
            while transformer.ready and len(transformer.tasks) < TASKS_PER_TRANSFORMER:
                picked = self._next_task()
                if picked is None:
                    return
                stream, batch, out_slot = picked
                transformer.outbox.put(
                    Task(
                        stream.id,
                        stream.arena_ref,
                        batch.seq,
                        batch.first_row,
                        batch.rows,
                        batch.slot,
                        batch.nbytes,
                        out_slot,
                        stream.report.pipeline.timezone,
                        stream.chunk_size,
                        batch.inline,
                        stream.analysis,
                    )
                )
                transformer.tasks.append((stream.id, batch.seq))
                stream.in_flight[batch.seq] = (batch, out_slot)

    def _next_task(self) -> tuple[StreamState, BatchReady, int] | None:
        streams = [s for s in self._streams.values() if not s.closing and s.error is None]
        for stream in round_robin(streams, next(self._rr)):
            if stream.retry:
                batch, out_slot = stream.retry.popleft()
                return stream, batch, out_slot
            if stream.ready and stream.result_free:
                return stream, stream.ready.popleft(), stream.result_free.popleft()
        return None

    # ---- messages

    def _handle(self, child: _Child, message: object) -> None:
        """Under the lock: one message from a child."""
        if message == READY:  # its imports are done
            child.ready = True
        elif isinstance(message, LogLine):
            self._relay_log(message)
        elif child.role == TRANSFORMER:
            self._on_task_result(child, message)
        else:
            self._on_producer_message(child, message)

    def _on_producer_message(self, producer: _Child, message: object) -> None:
        stream = self._streams.get(getattr(message, "stream_id", None))
        if stream is None or stream.closing:
            return  # a cancelled stream's late word
        stream.last_progress = time.monotonic()
        if isinstance(message, BatchReady):
            stream.ready.append(message)
        elif isinstance(message, SourceOpened):
            stream.columns, stream.total_rows = message.columns, message.total_rows
            stream.status = "running"
        elif isinstance(message, SourceDone):
            stream.results.total_batches = message.batches
            stream.source_done = True
            producer.streams.discard(stream.id)
        elif isinstance(message, StageFailed):
            self._fail(stream, _error_from(message))

    def _on_task_result(self, transformer: _Child, message: TaskDone | StageFailed) -> None:
        key = (message.stream_id, message.seq)
        if key in transformer.tasks:
            transformer.tasks.remove(key)
        stream = self._streams.get(message.stream_id)
        if stream is None or stream.closing or message.seq not in stream.in_flight:
            return  # a cancelled or failed stream's late result
        batch, _ = stream.in_flight.pop(message.seq)
        if isinstance(message, StageFailed):
            self._fail(stream, _error_from(message))
            return
        stream.results.put(batch, message)
        stream.last_progress = time.monotonic()
        self._credit_input(stream, batch)
        self._events.append(
            (
                "batch.done",
                {"rows": message.rows, "bytes": message.nbytes},
                {"stream_id": stream.id, "seq": message.seq},
            )
        )

    def _credit_input(self, stream: StreamState, batch: BatchReady) -> None:
        """The batch's input slot is free again: the producer may write into it."""
        if batch.slot is not None and not stream.source_done and stream.producer is not None:
            stream.producer.outbox.put(SlotCredit(stream.id, batch.slot))

    # ---- deaths

    def _on_exit(self, child: _Child) -> None:
        """A child's sentinel fired: account for its work, then replace it, or give up
        when the restart budget is spent."""
        while child.conn.poll():  # what it said before it went still counts
            message = _recv(child.conn)  # never blocks: nobody can write any more
            if message is None:
                break
            self._handle(child, message)
        code = self._reap(child)
        affordable = self.budget.record_death(time.monotonic())
        for stream in self._streams.values():
            stream.restarts += 1
        if not affordable:  # every stream fails: nothing of the dead child is waited on
            self._children_of(child.role).remove(child)
            self._break(
                f"ashstream's processes died {self.budget.in_window} times within "
                f"{self.budget.window_s:.0f} s (the last: {child.role} {child.index}, "
                f"{describe_exit(code)}); the pool gives up. If the system is short of "
                "memory, use fewer workers or smaller chunks."
            )
            return
        if child.role == PRODUCER:
            self._fail_streams_of(child, code)
        else:
            self._redispatch(child, code)
        if self._closing:  # close() stops the others; nothing is waited on from this one
            self._children_of(child.role).remove(child)
            return
        try:
            self._replace(child, code)
        except OSError as exc:  # out of processes, file descriptors or memory
            self._children_of(child.role).remove(child)
            self._break(
                f"cannot start a new {child.role} process in place of one that died "
                f"({describe_exit(code)}): {exc}. The system is short of resources."
            )

    def _children_of(self, role: str) -> list[_Child]:
        return self._transformers if role == TRANSFORMER else self._producers

    def _fail_streams_of(self, producer: _Child, code: int | None) -> None:
        """A dead producer's unfinished streams fail: a source is not re-read from the middle."""
        for stream_id in list(producer.streams):  # each _fail takes its stream out
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.source_done and not stream.closing:
                self._fail(
                    stream,
                    WorkerCrashed(
                        f"the producer process of stream {stream.id} died "
                        f"({describe_exit(code)}) after {stream.rows} rows had been taken; "
                        f"{death_hint(code)}"
                    ),
                )

    def _redispatch(self, transformer: _Child, code: int | None) -> None:
        """A dead transformer's batches go out again, unless one has killed too many."""
        lost, transformer.tasks, transformer.ready = list(transformer.tasks), [], False
        for position, (stream_id, seq) in enumerate(lost):
            stream = self._streams.get(stream_id)
            if stream is None or stream.closing or seq not in stream.in_flight:
                continue
            batch, out_slot = stream.in_flight.pop(seq)
            stream.redispatched += 1
            if suspected(position):
                stream.kills[seq] = stream.kills.get(seq, 0) + 1
            action = lost_batch_action(stream.kills.get(seq, 0), self.poison_policy)
            if action is LostBatch.RETRY:
                stream.retry.append((batch, out_slot))
                stream.retry = deque(sorted(stream.retry, key=lambda item: item[0].seq))
                continue
            last = batch.first_row + batch.rows - 1
            self._events.append(
                (
                    "batch.quarantined",
                    {"rows": batch.rows},
                    {
                        "stream_id": stream.id,
                        "first_row": batch.first_row,
                        "last_row": last,
                        "policy": self.poison_policy,
                    },
                )
            )
            if action is LostBatch.SKIP:
                self._skip(stream, batch, out_slot)
                continue
            self._fail(
                stream,
                WorkerCrashed(
                    f"rows {batch.first_row}..{last} (batch {seq}) killed {MAX_BATCH_KILLS} "
                    f"transformer processes (the last {describe_exit(code)}) and are not "
                    "retried; "
                    + (
                        death_hint(code)
                        if code == -signal.SIGBUS
                        else "look for a value in them that the encoder cannot handle, or "
                        "start the pool with poison_policy='skip' to leave them out and go on"
                    )
                ),
            )

    def _skip(self, stream: StreamState, batch: BatchReady, out_slot: int) -> None:
        """Leave a poison batch out: record its rows and deliver nothing in its place."""
        stream.skipped.append((batch.first_row, batch.first_row + batch.rows - 1))
        stream.results.put(batch, TaskDone(stream.id, batch.seq, 0, out_slot, 0, ()))
        self._credit_input(stream, batch)

    def _break(self, reason: str) -> None:
        """Too many restarts: fail every stream and refuse new ones (OTP's give-up)."""
        self.broken = reason
        for stream in self._streams.values():
            self._fail(stream, WorkerCrashed(reason))

    def _fail(self, stream: StreamState, error: AshstreamError) -> None:
        """Under the lock. A stream being closed keeps the status its caller gave it. A
        failed stream's reading stops at once, before its caller closes it: nothing of
        it will run again, and a queued stream may take its place (a dead producer's
        outbox drops the message)."""
        if stream.error is None and not stream.closing:
            stream.error = error
            stream.status = "failed"
            producer = stream.producer
            if producer is not None and stream.id in producer.streams:
                producer.streams.discard(stream.id)
                producer.outbox.put(StopStream(stream.id))
            self._events.append(
                (
                    "pipeline.failed",
                    {"rows": stream.rows},
                    {
                        "stream_id": stream.id,
                        "error": str(error),
                        "error_type": type(error).__name__,
                    },
                )
            )


def _recv(conn: Connection) -> object | None:
    """The next message on a child's pipe; None when the pipe is closed."""
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def _error_from(message: StageFailed) -> AshstreamError:
    cls = getattr(errors, message.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, AshstreamError)):
        cls = PipelineError
    return cls(message.message)


# What the fork server imports once, so that each child forks with them loaded instead of
# importing pyarrow and ashstream itself (a pool opened in 0.65 s, now 0.35 s, on 2 cores).
# Forking after these imports is safe: the only threads they start (numpy's BLAS pool,
# jemalloc's background thread) are idle and fork-aware, and DuckDB starts none until a
# connection, which the fork server never makes.
FORKSERVER_PRELOAD = (
    "ashstream.engines.local.transformer",
    "ashstream.engines.local.producer",
    "ashstream.engines.local.registry",
)


def _preload_in_forkserver() -> None:
    """Add ours to the fork server's preload list (it takes effect only if the fork
    server has not started yet in this process). The list is read from the private
    attribute that ``set_forkserver_preload`` writes, so a caller's own entries stay."""
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    forkserver.set_forkserver_preload(
        current + [name for name in FORKSERVER_PRELOAD if name not in current]
    )


def _stop_process(process: BaseProcess) -> None:
    """Join, then SIGTERM, then SIGKILL: a child never outlives this call."""
    process.join(JOIN_TIMEOUT_S)
    if process.is_alive():
        process.terminate()
        process.join(JOIN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
