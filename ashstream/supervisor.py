"""The only module that starts, signals and joins processes; it runs the dispatcher.

::

    caller thread                 dispatcher thread "ashstream-dispatch"        children
    -------------                 ---------------------------------------        --------
                                  BatchReady  -> stream.ready        <--pipe--  producer
                                  SlotCredit  (input slot freed)     --pipe-->  (a thread a stream)
                                  Task(seq, in slot, out slot)       --pipe-->  transformer 0..N-1
    next_chunk() <--condition---  TaskDone    -> stream.done[seq]    <--pipe--  (shared by all streams)
      reads the out slot, frees it, wakes the dispatcher

**Dispatcher.** One thread owns the parent's end of every pipe, so no two threads ever
write to one pipe. It waits on the pipes, on every child's sentinel (a dead child is
noticed at once, not by polling) and on a wake-up pipe the callers poke.

**Slots and backpressure.** Each stream has an arena of ``2 * window`` slots: inputs and
results. The producer may write only into input slots it holds credit for; an input slot
comes back to it when its result is safe in a result slot. A result slot is given to a
chunk at dispatch and freed when the caller has copied the text out. Chunks are
dispatched in ``seq`` order per stream, so the oldest undelivered chunk always holds a
result slot: the reorder window is bounded by the arena and cannot deadlock.

**Crashes.** A chunk stays in its input slot until its result exists, so the tasks of a
transformer that dies are dispatched again (keeping their result slots) to a
replacement process; a chunk that has killed ``MAX_CHUNK_KILLS`` transformers fails its
stream, naming its rows. A producer that dies fails the streams it had not finished and
is replaced; re-reading a source from the middle is not attempted, since a query
without ORDER BY need not return its rows in the same order twice.

**Producers.** ``n_producers`` processes (one per ``PRODUCER_PER_WORKERS`` transformers)
start with the pool and each serves many streams, one thread and DuckDB connection per
stream: a process costs ~50 MB once DuckDB is up, so memory does not grow with the
number of streams, and no stream waits for a process start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from ashstream import errors, telemetry
from ashstream.aggregate import Analysis, ClosedGroup, Collector
from ashstream.encode import EncodeStats
from ashstream.errors import AshstreamError, Cancelled, PipelineError, WorkerCrashed
from ashstream.pipeline.comms import (
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
from ashstream.pipeline.producer import run_producer
from ashstream.pipeline.worker import run_worker
from ashstream.registry import Registry
from ashstream.report import Report
from ashstream.shm import Arena, sweep_stale_segments

# Rows read and encoded together at least, whatever the chunk size: a transformer call
# costs about 1 ms of fixed overhead, so 1000-row chunks encoded one by one would run at
# half speed. The caller still gets chunks of at most chunk_size rows.
MIN_BATCH_ROWS = 16384
# One producer process per this many transformers: a producer serves several streams on
# threads, so memory does not grow with the number of streams.
PRODUCER_PER_WORKERS = 4
# Tasks handed to one transformer before it finishes the first: 2 hides the round trip
# through the dispatcher without letting one slow transformer hoard chunks.
TASKS_PER_WORKER = 2
# Chunks a stream may have in flight beyond one per transformer; each costs two slots.
EXTRA_WINDOW = 2
MAX_CHUNK_KILLS = 3  # as Dask's allowed-failures: a poison chunk is not retried forever
# At most this many transformer restarts within the window, then the pool gives up
# (OTP's default intensity is 3 in 5 s; data work restarts less eagerly).
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 60.0
TRANSFORMER, PRODUCER = "transformer", "producer"
HANDLED = object()  # _receive dealt with the message itself
_ENTRY_POINTS = {TRANSFORMER: run_worker, PRODUCER: run_producer}
JOIN_TIMEOUT_S = 1.0


@dataclass
class Chunk:
    """A run of consecutive rows, encoded: each row's Typst dictionary and ``,\\n``.

    ``groups`` holds the groups whose end this chunk revealed: each ended on the row
    before one of this chunk's rows (a group's end is known only when the next key is).
    The groups still open at the end come in :attr:`Summary.groups`.
    """

    seq: int
    first_row: int
    num_rows: int
    text: bytes
    groups: list[ClosedGroup] = field(default_factory=list)

    def rows(self) -> list[str]:
        """One Typst dictionary literal per row (literals never hold a raw newline)."""
        return self.text.decode("utf-8").split(",\n")[:-1]


@dataclass
class _Child:
    """A transformer or a producer process, and the parent's end of its pipe."""

    worker_id: int  # the slot number 0..N-1, kept across restarts
    process: BaseProcess
    conn: Connection
    ready: bool = False
    tasks: list[tuple[str, int]] = field(default_factory=list)  # (stream id, seq), in flight
    streams: set[str] = field(default_factory=set)  # producers: the streams it serves
    generation: int = 0  # restarts of this slot, for naming profiles


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
        self.retry: deque[tuple[BatchReady, int]] = deque()  # a dead transformer's chunks
        self.in_flight: dict[int, tuple[BatchReady, int]] = {}  # seq -> (batch, out slot)
        self.kills: dict[int, int] = {}  # seq -> transformers that died holding it
        self.done: dict[int, tuple[BatchReady, TaskDone]] = {}  # batch seq -> its result
        self.next_batch = 0  # the batch whose chunks the caller gets next
        self.total_batches: int | None = None
        self.pending: deque[Chunk] = deque()  # chunks of a consumed batch, not yet yielded
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.rows = 0
        self.chunks = 0
        self.bytes = 0
        self.restarts = 0  # transformer restarts while this stream ran
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
    ) -> None:
        self.ctx = mp.get_context(start_method)
        self.min_batch_rows = min_batch_rows
        self.profile_dir = profile_dir  # memray captures of every child go here
        self.n_workers = workers
        self.slot_bytes = slot_bytes
        self.max_restarts = max_restarts  # restart intensity, as OTP supervisors have
        self.restart_window_s = restart_window_s
        self.poison_policy = poison_policy  # "fail" or "skip" a batch that kills 3 workers
        self.broken: str | None = None  # why the pool gave up, once it has
        self._restarts: deque[float] = deque()  # monotonic times of recent transformer deaths
        self.restarts_total = 0  # transformer deaths since the pool started
        # The process tree's memory at the last health check, written by the health loop:
        # (RSS - shared plus the arenas once, cheap; PSS, exact and taken rarely).
        self.memory: tuple[int | None, int | None] = (None, None)
        self._lock = threading.Lock()
        # Held from reading a stream's entry to writing it to the registry, so that the
        # health loop's copy of a running stream never lands after its final state.
        self._publishing = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._streams: dict[str, StreamState] = {}
        self._workers: list[_Child] = []
        self.n_producers = max(1, -(-workers // PRODUCER_PER_WORKERS))
        self._producers: list[_Child] = []
        self._wake_r, self._wake_w = self.ctx.Pipe(duplex=False)
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
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is not None and not os.path.exists(main_file):
            # spawn and forkserver children re-import the main script by path
            raise PipelineError(
                f"cannot start worker processes: the main script {main_file!r} is not a "
                "file (code read from stdin?). Save it to a file and run that."
            )
        sweep_stale_segments()
        self.registry = Registry(self.ctx)
        self._workers = [self._start_child(TRANSFORMER, i) for i in range(self.n_workers)]
        self._producers = [self._start_child(PRODUCER, i) for i in range(self.n_producers)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self._workers + self._producers:  # no chunk is read before all are up
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                raise PipelineError("ashstream's processes did not start within 60 s")
            worker.ready = worker.conn.recv() == READY
        self._thread = threading.Thread(target=self._run, name="ashstream-dispatch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            streams = list(self._streams.values())
        for stream in streams:
            self.close_stream(stream, "cancelled")
        with self._lock:
            self._stopping = True
            self._wake()
        if self._thread is not None:
            self._thread.join(5)
        children = [(c.process, c.conn) for c in self._workers + self._producers]
        for _, conn in children:
            with contextlib.suppress(OSError):
                conn.send(STOP)
        for process, conn in children:
            _stop_process(process)
            conn.close()
        self._workers = []
        self._producers = []
        if self.registry is not None:
            self.registry.close()
        self._wake_r.close()
        self._wake_w.close()

    def _start_child(self, role: str, child_id: int, generation: int = 0) -> _Child:
        """Start a transformer or a producer; ``generation`` counts restarts of its slot."""
        parent_end, child_end = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_ENTRY_POINTS[role],
            args=(child_id, child_end, self.profile_dir, generation, self._log_level()),
            name=f"ashstream-{role}-{child_id}",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Child(child_id, process, parent_end, generation=generation)

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

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers]

    def busy_workers(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w.tasks)

    # ------------------------------------------------------------------- streams

    def open_stream(self, report: Report, chunk_size: int) -> StreamState:
        if self.broken:
            raise PipelineError(f"the pool can run no more streams: {self.broken}")
        window = self.n_workers + EXTRA_WINDOW
        arena = Arena.create(self.slot_bytes, 2 * window)
        try:
            stream = StreamState(secrets.token_hex(4), report, chunk_size, arena, window)
        except BaseException:
            arena.close()
            raise
        job = ProducerJob(
            stream.id, report, chunk_size, stream.arena_ref, stream.input_slots, self.min_batch_rows
        )
        with self._lock:
            producer = min(self._producers, key=lambda p: len(p.streams))
            producer.streams.add(stream.id)
            stream.producer = producer
            self._streams[stream.id] = stream
            # Only the dispatcher writes to a child's pipe.
            self._commands.append(lambda: self._send(producer, job))
            self._wake()
        self.registry.put(stream.id, self._entry(stream))
        telemetry.emit("pipeline.started", {}, {"stream_id": stream.id, "report": report.name})
        return stream

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
                if stream.next_batch in stream.done:
                    batch, result = stream.done.pop(stream.next_batch)
                    break
                if stream.total_batches is not None and stream.next_batch >= stream.total_batches:
                    if stream.collector is not None and not stream.final_groups:
                        stream.final_groups = stream.collector.finish()
                    return None
                if self._stopping:
                    raise PipelineError("the pool was closed while a stream was running")
                self._cond.wait(0.5)
        closed = []
        if stream.collector is not None and result.partial is not None:
            closed = stream.collector.add(result.partial, batch.first_row)
        # The slot stays this stream's until it is freed below, so read without the lock.
        start = row = 0
        for i, end in enumerate(result.chunk_ends):
            if result.inline is not None:
                text = result.inline[start:end]
            else:
                try:
                    text = stream.arena.read_bytes(result.out_slot, end, start)
                except ValueError:  # the arena was closed: cancelled from another thread
                    raise Cancelled(f"stream {stream.id} was cancelled") from None
            rows = min(stream.chunk_size, result.rows - row)
            first = batch.first_row + row
            groups = [g for g in closed if first <= g.last_row + 1 < first + rows]
            stream.pending.append(Chunk(batch.first_chunk + i, first, rows, text, groups))
            start, row = end, row + rows
        with self._cond:
            stream.result_free.append(result.out_slot)
            stream.last_progress = time.monotonic()
            stream.next_batch += 1
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
        producer = stream.producer
        if producer is not None and stream.id in producer.streams:
            producer.streams.discard(stream.id)
            if not stream.source_done:
                self._send(producer, StopStream(stream.id))
        for worker in self._workers:
            self._send(worker, ReleaseArena(stream.arena.name))
        stream.released.set()

    def _send(self, child: _Child, message: object) -> None:
        """Dispatcher thread only. A dead child's sentinel reports its death."""
        with contextlib.suppress(OSError):
            child.conn.send(message)

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
        entry["pids"]["transformers"] = [w.process.pid for w in self._workers]
        return entry

    def pause_admission(self, paused: bool) -> None:
        """Stop (or restart) starting new batches; results keep draining."""
        with self._lock:
            self._paused = paused
            for stream in self._streams.values():
                if stream.status in ("running", "paused"):
                    stream.status = "paused" if paused else "running"
            self._wake()

    def fail(self, stream: StreamState, error: AshstreamError) -> None:
        with self._lock:
            self._fail(stream, error)
            self._cond.notify_all()
        self._emit_outside_lock()

    def fail_all(self, error: AshstreamError) -> None:
        for stream in self.streams():
            self.fail(stream, error)

    def stalled_streams(self, no_progress_since: float) -> list[StreamState]:
        """Streams with no progress since then, that are not waiting for their caller."""
        with self._lock:
            return [
                s
                for s in self._streams.values()
                if s.error is None
                and not s.closing
                and not s.done
                and not self._paused
                and s.last_progress < no_progress_since
            ]

    def streams(self) -> list[StreamState]:
        with self._lock:
            return list(self._streams.values())

    # ---------------------------------------------------------------- dispatcher

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"!")

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                handlers = self._handlers()
            ready = wait(list(handlers), timeout=0.5)
            with self._lock:
                for obj in ready:
                    handlers[obj]()
                while self._commands:
                    self._commands.popleft()()
                self._schedule()
                self._cond.notify_all()
            # handlers may call back into the pool: never emit under the lock
            self._emit_outside_lock()

    def _handlers(self) -> dict[Any, Any]:
        handlers: dict[Any, Any] = {self._wake_r: self._drain_wakeups}
        for worker in self._workers:
            handlers[worker.conn] = lambda w=worker: self._on_worker_message(w)
            handlers[worker.process.sentinel] = lambda w=worker: self._on_worker_exit(w)
        for producer in self._producers:
            handlers[producer.conn] = lambda p=producer: self._on_producer_message(p)
            handlers[producer.process.sentinel] = lambda p=producer: self._on_producer_exit(p)
        return handlers

    def _drain_wakeups(self) -> None:
        while self._wake_r.poll():
            self._wake_r.recv_bytes()

    def _schedule(self) -> None:
        if self.broken or self._paused:
            return
        for worker in sorted(self._workers, key=lambda w: len(w.tasks)):
            while worker.ready and len(worker.tasks) < TASKS_PER_WORKER:
                picked = self._next_task()
                if picked is None:
                    return
                stream, batch, out_slot = picked
                task = Task(
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
                try:
                    worker.conn.send(task)
                except OSError:  # it died; its sentinel will bring the task back
                    pass
                worker.tasks.append((stream.id, batch.seq))
                stream.in_flight[batch.seq] = (batch, out_slot)

    def _next_task(self) -> tuple[StreamState, BatchReady, int] | None:
        streams = [s for s in self._streams.values() if not s.closing and s.error is None]
        if not streams:
            return None
        start = next(self._rr) % len(streams)
        for stream in streams[start:] + streams[:start]:
            if stream.retry:
                batch, out_slot = stream.retry.popleft()
                return stream, batch, out_slot
            if stream.ready and stream.result_free:
                return stream, stream.ready.popleft(), stream.result_free.popleft()
        return None

    # ---- producer events

    def _receive(self, child: _Child) -> object | None:
        """The child's next message; None when its pipe is closed (its sentinel says why).

        Messages every child sends are handled here: READY (its imports are done) and
        LogLine (relayed to the parent's logging); the caller sees them as HANDLED."""
        try:
            message = child.conn.recv()
        except (EOFError, OSError):
            return None
        if message == READY:
            child.ready = True
            return HANDLED
        if isinstance(message, LogLine):
            self._relay_log(message)
            return HANDLED
        return message

    def _on_producer_message(self, producer: _Child) -> bool:
        """Handle one message; False when the pipe is closed."""
        message = self._receive(producer)
        if message is None:
            return False
        stream = self._streams.get(getattr(message, "stream_id", None))
        if stream is None or stream.closing:
            return True  # a cancelled stream's late word
        stream.last_progress = time.monotonic()
        if isinstance(message, BatchReady):
            stream.ready.append(message)
        elif isinstance(message, SourceOpened):
            stream.columns, stream.total_rows = message.columns, message.total_rows
            stream.status = "running"
        elif isinstance(message, SourceDone):
            stream.total_batches = message.batches
            stream.source_done = True
            producer.streams.discard(stream.id)
        elif isinstance(message, StageFailed):
            self._fail(stream, _error_from(message))
        return True

    def _on_producer_exit(self, producer: _Child) -> None:
        while producer.conn.poll() and self._on_producer_message(producer):
            pass  # what it said before it went still counts
        producer.process.join(JOIN_TIMEOUT_S)  # reap it, for its exit code
        code = producer.process.exitcode
        producer.conn.close()
        for stream_id in producer.streams:
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.source_done and not stream.closing:
                self._fail(
                    stream,
                    WorkerCrashed(
                        f"the producer process of stream {stream.id} died (exit code {code}); "
                        "if the system was out of memory, lower chunk_size or the number of "
                        "workers"
                    ),
                )
        producer.generation += 1
        replacement = self._start_child(PRODUCER, producer.worker_id, producer.generation)
        producer.process, producer.conn = replacement.process, replacement.conn
        producer.ready, producer.streams = False, set()

    # ---- transformer events

    def _on_worker_message(self, worker: _Child) -> bool:
        """Handle one message; False when the pipe is closed."""
        message = self._receive(worker)
        if message is None:
            return False
        if isinstance(message, TaskDone | StageFailed):
            self._on_task_result(worker, message)
        return True

    def _on_task_result(self, worker: _Child, message: TaskDone | StageFailed) -> None:
        key = (message.stream_id, message.seq)
        if key in worker.tasks:
            worker.tasks.remove(key)
        stream = self._streams.get(message.stream_id)
        if stream is None or stream.closing or message.seq not in stream.in_flight:
            return  # a cancelled or failed stream's late result
        batch, _ = stream.in_flight.pop(message.seq)
        if isinstance(message, StageFailed):
            self._fail(stream, _error_from(message))
            return
        stream.done[message.seq] = (batch, message)
        stream.last_progress = time.monotonic()
        self._credit_input(stream, batch)
        self._events.append(
            (
                "chunk.done",
                {"rows": message.rows, "bytes": message.nbytes},
                {"stream_id": stream.id, "seq": message.seq},
            )
        )

    def _credit_input(self, stream: StreamState, batch: BatchReady) -> None:
        """The batch's input slot is free again: the producer may write into it."""
        if batch.slot is not None and not stream.source_done and stream.producer is not None:
            self._send(stream.producer, SlotCredit(stream.id, batch.slot))

    def _on_worker_exit(self, worker: _Child) -> None:
        while worker.conn.poll() and self._on_worker_message(worker):
            pass  # results it sent before dying still count
        worker.process.join(JOIN_TIMEOUT_S)  # reap it, for its exit code
        code = worker.process.exitcode
        worker.conn.close()
        lost, worker.tasks, worker.ready = list(worker.tasks), [], False
        now = time.monotonic()
        self.restarts_total += 1
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.restart_window_s:
            self._restarts.popleft()
        for stream in self._streams.values():
            stream.restarts += 1
        if len(self._restarts) > self.max_restarts:
            self._workers.remove(worker)  # no replacement: nothing of it is waited on
            self._break(
                f"transformer processes died {len(self._restarts)} times within "
                f"{self.restart_window_s:.0f} s (the last with exit code {code}); the pool "
                "gives up. If the system is short of memory, use fewer workers or smaller chunks."
            )
            return
        worker.generation += 1
        replacement = self._start_child(TRANSFORMER, worker.worker_id, worker.generation)
        self._events.append(
            (
                "worker.restarted",
                {"restarts_in_window": len(self._restarts)},
                {"worker_id": worker.worker_id, "exit_code": code, "pid": replacement.process.pid},
            )
        )
        worker.process, worker.conn = replacement.process, replacement.conn
        for position, (stream_id, seq) in enumerate(lost):
            stream = self._streams.get(stream_id)
            if stream is None or stream.closing or seq not in stream.in_flight:
                continue
            batch, out_slot = stream.in_flight.pop(seq)
            stream.redispatched += 1
            if position == 0:  # a transformer works in order: only its oldest task ran
                stream.kills[seq] = stream.kills.get(seq, 0) + 1
            if stream.kills.get(seq, 0) < MAX_CHUNK_KILLS:
                stream.retry.append((batch, out_slot))
                stream.retry = deque(sorted(stream.retry, key=lambda item: item[0].seq))
                continue
            last = batch.first_row + batch.rows - 1
            self._events.append(
                (
                    "chunk.quarantined",
                    {"rows": batch.rows},
                    {
                        "stream_id": stream.id,
                        "first_row": batch.first_row,
                        "last_row": last,
                        "policy": self.poison_policy,
                    },
                )
            )
            if self.poison_policy == "skip":
                self._skip(stream, batch, out_slot)
                continue
            self._fail(
                stream,
                WorkerCrashed(
                    f"rows {batch.first_row}..{last} (batch {seq}) killed {MAX_CHUNK_KILLS} "
                    f"transformer processes (the last exit code {code}) and are not retried; "
                    "look for a value in them that the encoder cannot handle, or start the "
                    "pool with poison_policy='skip' to leave them out and go on"
                ),
            )

    def _skip(self, stream: StreamState, batch: BatchReady, out_slot: int) -> None:
        """Leave a poison batch out: record its rows and deliver nothing in its place."""
        stream.skipped.append((batch.first_row, batch.first_row + batch.rows - 1))
        stream.done[batch.seq] = (batch, TaskDone(stream.id, batch.seq, 0, out_slot, 0, ()))
        self._credit_input(stream, batch)

    def _break(self, reason: str) -> None:
        """Too many restarts: fail every stream and refuse new ones (OTP's give-up)."""
        self.broken = reason
        for stream in self._streams.values():
            self._fail(stream, WorkerCrashed(reason))

    def _fail(self, stream: StreamState, error: AshstreamError) -> None:
        """Under the lock."""
        if stream.error is None:
            stream.error = error
            stream.status = "failed"
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


def _error_from(message: StageFailed) -> AshstreamError:
    cls = getattr(errors, message.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, AshstreamError)):
        cls = PipelineError
    return cls(message.message)


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
