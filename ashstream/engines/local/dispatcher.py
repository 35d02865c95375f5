"""The dispatcher thread: children's messages to their streams, deaths, and tasks out.

One thread, ``ashstream-dispatch``, reads the parent's end of every child's pipe and a
wake-up pipe the callers poke. Each round it reads what came (without the lock: a large
message takes a while), then under the lock routes each message to its stream, acts on
each death (EOF on a child's pipe), runs the callers' commands, admits queued streams
and sends tasks. What to do is decided in :mod:`.scheduling`; this module applies it.
It never writes to a pipe itself: each child's :class:`~.children.Outbox` does, so it
never blocks while holding the lock. An exception here breaks the pool cleanly
(:class:`PoolBroken`): every stream fails with an internal error, none waits forever.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext

from ashstream import errors
from ashstream.engines.local.admission import Admission
from ashstream.engines.local.children import (
    PRODUCER,
    TRANSFORMER,
    Child,
    ChildSet,
    Deferred,
    death_hint,
    describe_exit,
    receive,
)
from ashstream.engines.local.comms import (
    READY,
    BatchProduced,
    LogLine,
    ReleaseArena,
    SourceDone,
    SourceOpened,
    StageFailed,
    StopStream,
    Task,
    TaskDone,
)
from ashstream.engines.local.scheduling import (
    CALLER_WAITS_FOR_QUEUED_S,
    MAX_BATCH_KILLS,
    LostBatch,
    RestartBudget,
    death_action,
    dispatch_plan,
    least_loaded,
    triage,
)
from ashstream.engines.local.streams import StreamState
from ashstream.errors import INTERNAL_ERROR_ADVICE, AshstreamError, PipelineError, WorkerCrashed

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # a round's wait when nothing is queued: wake-ups come through the pipe


@dataclass(frozen=True)
class PoolBroken:
    """Why the pool gave up: every stream fails with ``error`` and new ones are refused."""

    error: AshstreamError

    def stream_error(self) -> AshstreamError:
        """A stream's own copy: streams are read by different threads."""
        return type(self.error)(*self.error.args)

    def refusal(self) -> PipelineError:
        return PipelineError(f"the pool can run no more streams: {self.error}")


class Dispatcher:
    """The loop, and the state it owns; every method runs under :attr:`lock` unless its
    docstring says otherwise."""

    def __init__(
        self,
        ctx: BaseContext,
        children: ChildSet,
        admission: Admission,
        budget: RestartBudget,
        poison_policy: str,
        deferred: Deferred,
    ) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # notified after each round
        self.streams: dict[str, StreamState] = {}  # open streams, by id
        self.broken: PoolBroken | None = None  # set by _break only
        self.closing = False  # close() has begun: start no more processes
        self.stopping = False  # the loop is to exit
        self.children = children
        self.admission = admission
        self.budget = budget  # child deaths afforded
        self.poison_policy = poison_policy  # "fail" or "skip" a batch that kills 3 transformers
        self.tasks: dict[int, list[tuple[str, int]]] = {}  # transformer slot -> (stream, seq)
        self.serving: dict[int, set[str]] = {}  # producer slot -> ids of the streams it reads
        self._deferred = deferred  # events and log lines, emitted after the lock
        self._commands: deque[Callable[[], None]] = deque()  # run by the loop
        self._turn = 0  # round robin over streams
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        # Written under the lock: never block on it (a 5-byte message is written whole
        # or not at all); a full pipe already wakes the dispatcher.
        os.set_blocking(self._wake_w.fileno(), False)
        self._thread = threading.Thread(target=self._run, name="ashstream-dispatch", daemon=True)

    # ---- lifetime (without the lock)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the loop and wait for it (5 s at most)."""
        with self.lock:
            self.stopping = True
            self.wake()
        if self._thread.ident is not None:
            self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def wake(self) -> None:
        """Make the loop run a round soon. Never blocks."""
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass  # closed (the pool is closing), or full (the dispatcher wakes anyway)

    def call_soon(self, command: Callable[[], None]) -> None:
        """Run ``command`` in the loop's next round, under the lock."""
        self._commands.append(command)
        self.wake()

    # ---- the loop

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as exc:
            self.internal_error(exc)

    def _round(self) -> bool:
        """Wait for messages, deaths or a wake-up, act on them; False once stopping."""
        with self.lock:
            if self.stopping:
                return False
            conns = {child.conn: child for child in self.children.all()}
            # a queued stream's turn can come from the clock alone (see Admission)
            timeout_s = CALLER_WAITS_FOR_QUEUED_S / 2 if self.admission.waiting else IDLE_WAIT_S
        readable = wait([self._wake_r, *conns], timeout=timeout_s)
        # Read without the lock: a large message takes a while, and a child stopped in
        # the middle of sending must not hold up the callers. Only this thread reads.
        received = [(conns[h], receive(h)) for h in readable if h in conns]
        if self._wake_r in readable:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        with self.lock:
            for child, message in received:
                if not any(c is child for c in self.children.slots[child.role]):
                    continue  # replaced or removed meanwhile
                if message is None:  # EOF: the child is gone, and all it said was read
                    self._died(child)
                else:
                    self._handle(child, message)
            while self._commands:
                self._commands.popleft()()
            self.admit()
            self._schedule()
            self.cond.notify_all()
        self._deferred.flush()  # handlers may call back into the pool: never under the lock
        return True

    def internal_error(self, exc: BaseException) -> None:
        """A bug in the parent's own machinery (this loop, an outbox): break the pool.
        Takes the lock itself."""
        logger.debug("ashstream internal error", exc_info=exc)
        reason = (
            f"ashstream internal error, please report: {type(exc).__name__}: {exc}. "
            f"{INTERNAL_ERROR_ADVICE}"
        )
        with self.lock:
            self._break(PoolBroken(PipelineError(reason)))
            self.cond.notify_all()
        self._deferred.flush()

    # ---- admission and scheduling

    def reading(self, stream: StreamState) -> bool:
        """Whether a producer has the stream's source open (it counts against
        max_reading_streams), until it is read to the end, fails or is closed."""
        producer = stream.work.producer
        return producer is not None and stream.id in self.serving.get(producer, ())

    def admit(self) -> None:
        """Hand queued streams to the least loaded producer, as Admission allows."""
        if self.closing:
            return  # close() cancels every stream, the queued ones too
        producers = self.children.slots[PRODUCER]
        while True:
            now = time.monotonic()
            readers = [s for s in self.streams.values() if self.reading(s) and not s.closing]
            picked = self.admission.next_reader(readers, now)
            if picked is None:
                return
            stream, job = picked
            producer = producers[
                least_loaded([len(self.serving.get(p.index, ())) for p in producers])
            ]
            self.serving.setdefault(producer.index, set()).add(stream.id)
            stream.work.producer = producer.index
            stream.status = "starting"
            stream.last_progress = now  # the queue's wait is not the stream's stall
            producer.outbox.put(job)

    def _schedule(self) -> None:
        """Send the batches the dispatch plan says, while new batches may go out."""
        if self.broken or not self.admission.may_dispatch():
            return
        transformers = self.children.slots[TRANSFORMER]
        streams = [s for s in self.streams.values() if not s.settled()]
        loads = [len(self.tasks.get(t.index, ())) if t.ready else None for t in transformers]
        backlogs = [self.admission.backlog(s) for s in streams]
        plan, self._turn = dispatch_plan(loads, backlogs, self._turn)
        for transformer_at, stream_at, from_retry in plan:
            transformer, stream = transformers[transformer_at], streams[stream_at]
            if from_retry:
                batch, out_slot = stream.work.retry.popleft()
            else:
                batch = stream.work.produced.popleft()
                out_slot = self.admission.result_slot(stream)
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
            self.tasks.setdefault(transformer.index, []).append((stream.id, batch.seq))
            stream.work.in_flight[batch.seq] = (batch, out_slot)

    # ---- messages

    def _handle(self, child: Child, message: object) -> None:
        if message == READY:  # its imports are done
            child.ready = True
        elif isinstance(message, LogLine):
            self._deferred.log(message)
        elif child.role == TRANSFORMER:
            self._on_task_result(child, message)
        else:
            self._on_producer_message(child, message)

    def _on_producer_message(self, producer: Child, message: object) -> None:
        stream = self.streams.get(getattr(message, "stream_id", None))
        if stream is None or stream.closing:
            return  # a cancelled stream's late word
        stream.last_progress = time.monotonic()
        if isinstance(message, BatchProduced):
            stream.work.produced.append(message)
        elif isinstance(message, SourceOpened):
            stream.columns, stream.total_rows = message.columns, message.total_rows
            stream.status = "running"
        elif isinstance(message, SourceDone):
            stream.results.total_batches = message.batches
            stream.work.source_done = True
            self.serving.get(producer.index, set()).discard(stream.id)
        elif isinstance(message, StageFailed):
            self.fail(stream, _error_from(message))

    def _on_task_result(self, transformer: Child, message: TaskDone | StageFailed) -> None:
        tasks = self.tasks.get(transformer.index, [])
        if (message.stream_id, message.seq) in tasks:
            tasks.remove((message.stream_id, message.seq))
        stream = self.streams.get(message.stream_id)
        if stream is None or stream.closing or message.seq not in stream.work.in_flight:
            return  # a cancelled or failed stream's late result
        batch, out_slot = stream.work.in_flight.pop(message.seq)
        if isinstance(message, StageFailed):
            self.fail(stream, _error_from(message))
            return
        self._result(stream, batch, out_slot, message)
        stream.last_progress = time.monotonic()
        self._deferred.event(
            "batch.done",
            {"rows": message.rows, "bytes": message.nbytes},
            {"stream_id": stream.id, "seq": message.seq},
        )

    def _result(
        self, stream: StreamState, batch: BatchProduced, out_slot: int, result: TaskDone | None
    ) -> None:
        """A batch's result is safe (or it was left out): its input slot goes back."""
        stream.results.put(batch, out_slot, result)
        credit = self.admission.credit(stream, batch)
        if credit is not None:
            self._tell_producer(stream, credit)

    # ---- deaths

    def _died(self, child: Child) -> None:
        """A child's pipe reached EOF: account for its work, then replace it, or break
        the pool when the restart budget is spent."""
        code = self.children.reap(child)
        affordable = self.budget.record_death(time.monotonic())
        for stream in self.streams.values():
            stream.restarts += 1
        action = death_action(child.role, affordable, self.closing)
        if action.give_up:  # every stream fails: nothing of the dead child is waited on
            self.children.remove(child)
            self._break(
                PoolBroken(
                    WorkerCrashed(
                        f"ashstream's processes died {self.budget.in_window} times within "
                        f"{self.budget.window_s:.0f} s (the last: {child.role} {child.index}, "
                        f"{describe_exit(code)}); the pool gives up. If the system is short "
                        "of memory, use fewer workers or smaller chunks."
                    )
                )
            )
            return
        if action.fail_streams:
            self._fail_streams_of(child, code)
        if action.redispatch:
            self._redispatch(child, code)
        if not action.replace:  # close() stops the others; nothing is waited on from it
            self.children.remove(child)
            return
        try:
            self.children.replace(child, code, self.budget)
        except OSError as exc:  # out of processes, file descriptors or memory
            self.children.remove(child)
            self._break(
                PoolBroken(
                    WorkerCrashed(
                        f"cannot start a new {child.role} process in place of one that died "
                        f"({describe_exit(code)}): {exc}. The system is short of resources."
                    )
                )
            )

    def _fail_streams_of(self, producer: Child, code: int | None) -> None:
        """A dead producer's unfinished streams fail: a source is not re-read from the
        middle, since a query without ORDER BY need not return its rows in the same
        order twice."""
        for stream_id in list(self.serving.pop(producer.index, ())):
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.work.source_done and not stream.closing:
                self.fail(
                    stream,
                    WorkerCrashed(
                        f"the producer process of stream {stream.id} died "
                        f"({describe_exit(code)}) after {stream.rows} rows had been taken; "
                        f"{death_hint(code)}"
                    ),
                )

    def _redispatch(self, transformer: Child, code: int | None) -> None:
        """A dead transformer's batches go out again, unless one has killed too many."""
        lost = self.tasks.pop(transformer.index, [])
        live = [self._in_flight(stream_id, seq) for stream_id, seq in lost]
        kills_before = [
            s.work.kills.get(seq, 0) if s else 0 for s, (_, seq) in zip(live, lost, strict=True)
        ]
        for stream, (_, seq), (kills, fate) in zip(
            live, lost, triage(kills_before, self.poison_policy), strict=True
        ):
            if stream is None:
                continue  # a cancelled or failed stream's batch
            batch, out_slot = stream.work.in_flight.pop(seq)
            stream.redispatched += 1
            stream.work.kills[seq] = kills
            if fate is LostBatch.RETRY:
                stream.work.retry.append((batch, out_slot))
                stream.work.retry = deque(sorted(stream.work.retry, key=lambda r: r[0].seq))
                continue
            last = batch.first_row + batch.rows - 1
            self._deferred.event(
                "batch.quarantined",
                {"rows": batch.rows},
                {
                    "stream_id": stream.id,
                    "first_row": batch.first_row,
                    "last_row": last,
                    "policy": self.poison_policy,
                },
            )
            if fate is LostBatch.SKIP:  # its rows are recorded; nothing is delivered
                stream.skipped.append((batch.first_row, last))
                self._result(stream, batch, out_slot, None)
                continue
            self.fail(
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

    def _in_flight(self, stream_id: str, seq: int) -> StreamState | None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.closing or seq not in stream.work.in_flight:
            return None
        return stream

    # ---- failing

    def _break(self, broken: PoolBroken) -> None:
        """The one place the pool breaks (OTP's give-up): every stream fails, and new
        ones are refused. The first reason stays."""
        self.broken = self.broken or broken
        for stream in self.streams.values():
            self.fail(stream, broken.stream_error())

    def fail(self, stream: StreamState, error: AshstreamError) -> None:
        """A stream being closed keeps the status its caller gave it, and so does one
        whose caller has taken every batch (it finishes its merge outside the lock,
        with every row: a child's death or the memory breaker then fails it no more).
        A failed stream's reading stops at once, before its caller closes it: nothing
        of it will run again, and a queued stream may take its place (a dead
        producer's outbox drops the message)."""
        if stream.settled() or stream.results.finished():
            return
        stream.error = error
        stream.status = "failed"
        if self.reading(stream):
            self.serving[stream.work.producer].discard(stream.id)
            self._tell_producer(stream, StopStream(stream.id))
        self._deferred.event(
            "pipeline.failed",
            {"rows": stream.rows},
            {"stream_id": stream.id, "error": str(error), "error_type": type(error).__name__},
        )

    def release(self, stream: StreamState) -> None:
        """A stream closed: its producer stops reading and the transformers unmap its arena."""
        self.admission.forget(stream)
        if self.reading(stream):
            self.serving[stream.work.producer].discard(stream.id)
            if not stream.work.source_done:
                self._tell_producer(stream, StopStream(stream.id))
        for transformer in self.children.slots[TRANSFORMER]:
            transformer.outbox.put(ReleaseArena(stream.arena.name))
        stream.released.set()

    def _tell_producer(self, stream: StreamState, message: object) -> None:
        """Send to the producer reading ``stream`` (none, once the pool broke)."""
        producer = self.children.slot(PRODUCER, stream.work.producer)
        if producer is not None:
            producer.outbox.put(message)


def _error_from(message: StageFailed) -> AshstreamError:
    cls = getattr(errors, message.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, AshstreamError)):
        cls = PipelineError
    return cls(message.message)
