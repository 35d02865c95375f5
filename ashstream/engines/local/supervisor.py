"""The local engine's heart, as a thin façade: start and close the pool, open, read and
close a stream, publish the streams' records.

::

    caller thread               dispatcher thread "ashstream-dispatch"     outbox threads      children
    -------------               ---------------------------------------     --------------      --------
                                BatchProduced -> stream.work   <--------------pipe-------  producer
                                SlotCredit (input slot freed)  -> outbox ------pipe------->  (a thread a stream)
                                Task(seq, in slot, out slot)   -> outbox ------pipe------->  transformer 0..N-1
    next_chunk() <--condition-- TaskDone -> stream.results     <----------------pipe-------  (shared by all streams)
      cuts the out slot's text into chunks (OrderedMerge), lends them to the caller,
      frees the slot once they are taken (a chunk kept is copied), wakes the dispatcher

The parts, each of which imports only those before it:

* :mod:`.scheduling`: every decision, as plain functions of plain values.
* :mod:`.streams`: a stream's state in the parent (``StreamState``, ``ResultOrder``).
* :mod:`.children`: ``ChildSet``, the processes, their pipes and outboxes, the lifeline,
  readiness and replacement; it knows nothing of streams.
* :mod:`.admission`: what holds work back: the reading-stream limit, the memory pause
  and the slots of each stream's arena.
* :mod:`.dispatcher`: the loop that routes messages, acts on deaths and sends tasks.
* this module: ``Supervisor``, what the pool and the health loop call.

**Crashes.** A batch stays in its input slot until its result exists, so the tasks of a
transformer that dies are dispatched again (keeping their result slots) to a replacement
process; a batch that keeps killing transformers is skipped or fails its stream, and the
pool affords so many restarts (:mod:`.scheduling`). A producer that dies fails the
streams it had not finished and is replaced. A child that dies while the pool starts is
replaced under the same restart budget, or the start fails naming it.

**Producers.** ``n_producers`` processes (one per ``PRODUCER_PER_TRANSFORMERS``
transformers) start with the pool and each serves many streams, one thread and DuckDB
connection per stream, so memory does not grow with the number of streams and no stream
waits for a process start.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import threading
import time
import weakref
from typing import Any

import pyarrow as pa

from ashstream import telemetry
from ashstream.batch_job import MIN_BATCH_ROWS, EncodedBatch
from ashstream.chunks import Chunk
from ashstream.engines.local.admission import Admission
from ashstream.engines.local.children import PRODUCER, TRANSFORMER, ChildSet, Deferred
from ashstream.engines.local.comms import ProducerJob, TaskDone
from ashstream.engines.local.dispatcher import Dispatcher
from ashstream.engines.local.main_guard import check_children_can_start
from ashstream.engines.local.registry import Registry
from ashstream.engines.local.scheduling import (
    CALLER_WAIT_S,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    RestartBudget,
    reading_streams_limit,
    stalled,
    stream_window,
)
from ashstream.engines.local.shm import Arena, new_pool_id, sweep_stale_segments
from ashstream.engines.local.streams import StreamState
from ashstream.errors import AshstreamError, Cancelled, PipelineError
from ashstream.report import Report
from ashstream.sources import sweep_stale_spill_dirs

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW_S", "Chunk", "StreamState", "Supervisor"]

# One producer process per this many transformers: a producer serves several streams on
# threads, so memory does not grow with the number of streams.
PRODUCER_PER_TRANSFORMERS = 4
CALLER_POLL_S = 0.5  # a waiting caller looks again this often, should a wake-up be missed
RELEASE_TIMEOUT_S = 5.0  # how long close_stream waits for the dispatcher's release


class Supervisor:
    """Owns the children, the dispatcher and the registry; every stream goes through it."""

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
        caller_wait_s: float = CALLER_WAIT_S,
    ) -> None:
        ctx = mp.get_context(start_method)
        self.pool_id = new_pool_id()  # names its segments; children clean up by it
        self.workers = workers
        self.slot_bytes = slot_bytes
        self.min_batch_rows = min_batch_rows
        self.budget = RestartBudget(max_restarts, restart_window_s)  # child deaths afforded
        # The process tree's memory at the last health check, written by the health loop:
        # (RSS - shared plus the arenas once, cheap; PSS, exact and taken rarely).
        self.memory: tuple[int | None, int | None] = (None, None)
        self.registry: Registry | None = None
        self._deferred = Deferred()
        counts = {TRANSFORMER: workers, PRODUCER: -(-workers // PRODUCER_PER_TRANSFORMERS)}
        self.children = ChildSet(
            ctx, self.pool_id, counts, profile_dir, self._deferred, self._outbox_failed
        )
        limit = max_reading_streams or reading_streams_limit(workers)
        self.admission = Admission(limit, caller_wait_s)
        self.dispatcher = Dispatcher(
            ctx, self.children, self.admission, self.budget, poison_policy, self._deferred
        )
        # Held from reading a stream's entry to writing it to the registry, so that the
        # health loop's copy of a running stream never lands after its final state.
        self._publishing = threading.Lock()

    def _outbox_failed(self, exc: BaseException) -> None:
        self.dispatcher.internal_error(exc)

    # ------------------------------------------------------------------ lifetime

    def open(self) -> None:
        """Start the registry, every child and the dispatcher; see :meth:`ChildSet.start`."""
        check_children_can_start()
        sweep_stale_segments()
        sweep_stale_spill_dirs()
        self.children.preload()
        self.registry = Registry(self.children.ctx, self.children.lifeline_r, self.pool_id)
        try:
            self.children.start(self.budget, self._deferred.log)
        finally:
            self._deferred.flush()
        self.dispatcher.start()

    def close(self) -> None:
        """Cancel the streams, stop the dispatcher and every child, unlink every segment.

        Each stage runs even if one before it failed (a second Ctrl-C, say): a pool that
        closed must leave no process, thread or segment behind."""
        with self.dispatcher.lock:
            self.dispatcher.closing = True
            streams = list(self.dispatcher.streams.values())
        try:
            for stream in streams:
                self.close_stream(stream, "cancelled")
        finally:
            try:
                self.dispatcher.stop()
            finally:
                try:
                    self.children.stop()
                finally:
                    if self.registry is not None:
                        self.registry.close()
                    self.children.close_lifeline()
        self._deferred.flush()

    # ------------------------------------------------------------------- streams

    def start_stream(self, report: Report, chunk_size: int) -> StreamState:
        """Start a stream, queued until Admission lets its producer read it."""
        dispatcher = self.dispatcher
        self._check_open()
        with dispatcher.lock:
            window = stream_window(self.workers, len(dispatcher.streams))
        arena = Arena.create(self.slot_bytes, 2 * window, self.pool_id)
        try:
            stream = StreamState(secrets.token_hex(4), report, chunk_size, arena, window)
            job = ProducerJob(
                stream.id,
                report,
                chunk_size,
                stream.arena_ref,
                stream.work.input_slots,
                self.min_batch_rows,
            )
            with dispatcher.lock:
                self._check_open()  # again: the pool may have broken or begun to close
                dispatcher.streams[stream.id] = stream
                self.admission.queue(stream, job)
                dispatcher.admit()
        except BaseException:
            arena.close()
            raise
        with self._publishing:  # never after the stream's final state
            with dispatcher.lock:
                entry = None if stream.closing else self._entry(stream)
            if entry is not None:
                self.registry.put(stream.id, entry)
        telemetry.emit("pipeline.started", {}, {"stream_id": stream.id, "report": report.name})
        return stream

    def _check_open(self) -> None:
        if self.dispatcher.broken:
            raise self.dispatcher.broken.refusal()
        if self.dispatcher.closing:
            raise PipelineError("the pool is closing; start a new one")

    def next_chunk(self, stream: StreamState) -> Chunk | None:
        """The next chunk in source order, or None at the end. Runs in the caller's
        thread; blocks until the chunk is there, the stream fails or the pool closes."""
        while not stream.pending:
            self._give_back(stream)
            taken = self._next_batch(stream)
            if taken is None:
                return None
            batch, out_slot, result = taken
            lent = False
            if result is None:  # left out under poison_policy="skip"
                stream.merge.skip(batch.rows)
            else:  # the slot stays this stream's until freed: read without the lock
                chunks = stream.merge.take(self._encoded(stream, result))
                stream.pending.extend(chunks)
                # The chunks are views of the slot, lent until the caller has taken them
                # all (it writes them from there); with one result slot, the next batch
                # could not be encoded meanwhile, so they are copied now instead.
                lent = result.inline is None and len(stream.work.input_slots) > 1
                if lent:
                    stream.lent = (out_slot, [weakref.ref(c) for c in chunks])
                else:
                    for chunk in chunks:
                        chunk.detach()
            with self.dispatcher.lock:
                if not lent:
                    self.admission.result_taken(stream, out_slot)
                stream.last_progress = time.monotonic()
                stream.results.taken()
                if result is not None:
                    stream.rows += result.rows
                    stream.chunks += len(result.chunk_ends)
                    stream.bytes += result.nbytes
                self.dispatcher.wake()
        try:
            return stream.pending.popleft()
        except IndexError:  # closed meanwhile from another thread (cancel, pool close)
            raise Cancelled(f"stream {stream.id} was cancelled") from None

    def _give_back(self, stream: StreamState) -> None:
        """The caller has taken every chunk of the batch whose slot it was lent: chunks
        it still holds take a copy of their text, and the slot goes back. In the
        caller's thread (or the one closing the stream)."""
        lent, stream.lent = stream.lent, None
        if lent is None:
            return
        slot, chunks = lent
        for ref in chunks:
            chunk = ref()
            if chunk is not None:
                chunk.detach()
        with self.dispatcher.lock:
            if not stream.closing:
                self.admission.result_taken(stream, slot)
                self.dispatcher.wake()

    def _next_batch(self, stream: StreamState) -> tuple[Any, int, TaskDone | None] | None:
        """Wait for the stream's next result in order; None at its end (the merge
        finished then, outside the lock: a cached run's last unit is merged there)."""
        with self.dispatcher.cond:
            while True:
                if stream.error is not None:
                    raise stream.error
                if stream.closing:
                    raise Cancelled(f"stream {stream.id} was cancelled")
                if stream.results.has_next():
                    return stream.results.take()
                if stream.results.finished():
                    break
                if self.dispatcher.stopping:
                    raise PipelineError("the pool was closed while a stream was running")
                if stream.work.producer is None and not stream.caller_waits:
                    stream.caller_waits = True  # queued: its turn may come sooner
                    self.dispatcher.wake()
                self.dispatcher.cond.wait(CALLER_POLL_S)
        if not stream.merge_finished:
            stream.merge.finish()
            stream.merge_finished = True
        return None

    @staticmethod
    def _encoded(stream: StreamState, result: TaskDone) -> EncodedBatch:
        """A transformer's result as the batch job returns it, its text read in place."""
        if result.inline is not None:
            text = pa.py_buffer(result.inline)
        else:
            try:
                text = stream.arena.slot_buffer(result.out_slot, result.nbytes)
            except ValueError:  # the arena was closed: cancelled from another thread
                raise Cancelled(f"stream {stream.id} was cancelled") from None
        return EncodedBatch(
            text=text,
            rows=result.rows,
            chunk_ends=result.chunk_ends,
            lossy=result.lossy,
            partial=result.partial,
            mark=result.mark,
            text_crc=result.text_crc,
        )

    def close_stream(self, stream: StreamState, status: str) -> None:
        """Stop the stream's production, release its arena everywhere, record its status.

        Runs in the caller's thread; returns when nothing of the stream is left."""
        dispatcher = self.dispatcher
        with dispatcher.lock:
            if stream.closing:
                return
            stream.closing = True
            if stream.error is None:
                stream.status = status
            stream.finished_at = time.time()
            dispatcher.call_soon(lambda: dispatcher.release(stream))
            dispatcher_alive = dispatcher.alive()
        if dispatcher_alive:
            stream.released.wait(RELEASE_TIMEOUT_S)
        self._give_back(stream)  # a chunk the caller keeps outlives the arena
        stream.pending.clear()
        stream.arena.close()
        with self._publishing:
            with dispatcher.lock:
                dispatcher.streams.pop(stream.id, None)
                entry = self._entry(stream)
            self.registry.put(stream.id, entry)
        self._deferred.flush()
        telemetry.emit(
            "pipeline.stopped",
            {
                "rows": stream.rows,
                "chunks": stream.chunks,
                "duration_s": stream.finished_at - stream.started_at,
            },
            {"stream_id": stream.id, "status": stream.status},
        )

    # ------------------------------------------------------------------ records

    def publish(self) -> None:
        """Copy every running stream's counters to the registry (the health loop calls it)."""
        with self._publishing:
            with self.dispatcher.lock:
                entries = [
                    self._entry(s) for s in self.dispatcher.streams.values() if not s.closing
                ]
            for entry in entries:
                self.registry.put(entry["id"], entry)

    def _entry(self, stream: StreamState) -> dict[str, Any]:
        """The stream's registry entry, with what the pool knows of its processes."""
        producer = self.children.slot(PRODUCER, stream.work.producer)
        pids = {
            "producer": producer.process.pid if producer is not None else None,
            "transformers": self.children.pids(TRANSFORMER),
        }
        return stream.record(pids, self.memory).to_dict()

    def streams(self) -> list[StreamState]:
        with self.dispatcher.lock:
            return list(self.dispatcher.streams.values())

    def transformer_pids(self) -> list[int]:
        with self.dispatcher.lock:
            return self.children.pids(TRANSFORMER)

    def busy_transformers(self) -> int:
        with self.dispatcher.lock:
            return sum(1 for tasks in self.dispatcher.tasks.values() if tasks)

    # ------------------------------------------------------- for the health loop

    def pause_admission(self, paused: bool) -> None:
        """Stop (or restart) starting new batches; results keep draining."""
        with self.dispatcher.lock:
            self.admission.paused = paused
            for stream in self.dispatcher.streams.values():
                if stream.status in ("running", "paused"):
                    stream.status = "paused" if paused else "running"
            self.dispatcher.wake()

    @property
    def paused(self) -> bool:
        return self.admission.paused

    def fail(self, stream: StreamState, error: AshstreamError) -> None:
        with self.dispatcher.lock:
            self.dispatcher.fail(stream, error)
            self.dispatcher.cond.notify_all()
        self._deferred.flush()

    def fail_all(self, error: AshstreamError) -> None:
        for stream in self.streams():
            self.fail(stream, error)

    def stalled_streams(self, now: float, timeout_s: float) -> list[StreamState]:
        """Streams with no progress for ``timeout_s`` at ``now`` (monotonic), as
        :func:`.scheduling.stalled` says."""
        with self.dispatcher.lock:
            return [
                s
                for s in self.dispatcher.streams.values()
                if not s.settled()
                and stalled(
                    s.work.producer is not None,
                    s.caller_can_take(),
                    now - s.last_progress,
                    timeout_s,
                )
            ]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))
