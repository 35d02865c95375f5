"""What holds work back, in one place: the reading-stream limit, the memory pause and the slots.

* **Reading streams.** At most ``max_reading_streams`` streams have their source open; a
  stream opened beyond that waits in the queue here (``queued``) until
  :func:`.scheduling.admission_pick` lets it in.
* **The memory pause.** While the health loop's breaker says so, no new batch goes out;
  results keep draining, so memory can only go down.
* **Slots.** Each stream's arena holds ``window`` input slots and ``window`` result slots.
  The producer writes only into input slots it holds credit for, and gets one back
  (a :class:`SlotCredit`) once that batch's result is safe in a result slot. A batch is
  dispatched only with a free result slot, freed when the caller has taken its
  chunks (written from the slot, or copied out of it).

Guarded by the dispatcher's lock; the decisions themselves are in :mod:`.scheduling`.
"""

from __future__ import annotations

from collections import deque

from ashstream.engines.local.comms import BatchProduced, ProducerJob, SlotCredit
from ashstream.engines.local.scheduling import (
    CALLER_WAIT_S,
    Backlog,
    admission_pick,
    waited_on_caller_s,
)
from ashstream.engines.local.streams import StreamState


class Admission:
    """The queue of streams waiting to read, the memory pause, and each stream's slots."""

    def __init__(self, max_reading_streams: int, caller_wait_s: float = CALLER_WAIT_S) -> None:
        self.max_reading_streams = max_reading_streams
        self.caller_wait_s = caller_wait_s  # readers' wait on their callers that lets one in
        self.paused = False  # the memory breaker stopped new batches (health loop writes)
        # Streams opened while max_reading_streams others read, in the order they came.
        self._queued: deque[tuple[StreamState, ProducerJob]] = deque()

    # ---- reading streams

    def queue(self, stream: StreamState, job: ProducerJob) -> None:
        self._queued.append((stream, job))

    def forget(self, stream: StreamState) -> None:
        """A stream closed: it leaves the queue, if it was there."""
        self._queued = deque(q for q in self._queued if q[0] is not stream)

    @property
    def waiting(self) -> bool:
        """Streams wait in the queue: their turn can come from the clock alone."""
        return bool(self._queued)

    def next_reader(
        self, readers: list[StreamState], now: float
    ) -> tuple[StreamState, ProducerJob] | None:
        """Take the queued stream that may open its source now, if any (``readers``:
        the streams reading now; ``now``: monotonic)."""
        waited = [
            waited_on_caller_s(
                len(s.work.free_results),
                len(s.work.in_flight),
                len(s.work.retry),
                now - s.last_progress,
            )
            for s in readers
        ]
        while self._queued:
            awaited = next((i for i, q in enumerate(self._queued) if q[0].caller_waits), None)
            pick = admission_pick(self.max_reading_streams, waited, awaited, self.caller_wait_s)
            if pick is None:
                return None
            stream, job = self._queued[pick]
            del self._queued[pick]
            if not stream.settled():
                return stream, job
        return None

    # ---- the memory pause

    def may_dispatch(self) -> bool:
        return not self.paused

    # ---- slots

    @staticmethod
    def backlog(stream: StreamState) -> Backlog:
        work = stream.work
        return Backlog(len(work.retry), len(work.produced), len(work.free_results))

    @staticmethod
    def result_slot(stream: StreamState) -> int:
        """A free result slot for a batch going out; :meth:`backlog` said there is one."""
        return stream.work.free_results.popleft()

    @staticmethod
    def result_taken(stream: StreamState, slot: int) -> None:
        """The caller is done with the text in ``slot``: the next batch may use it."""
        stream.work.free_results.append(slot)

    @staticmethod
    def credit(stream: StreamState, batch: BatchProduced) -> SlotCredit | None:
        """What the producer is owed now that ``batch``'s result is safe: its input slot
        back, unless it travelled inline or the producer has finished the stream."""
        work = stream.work
        if batch.slot is None or work.source_done or work.producer is None:
            return None
        return SlotCredit(stream.id, batch.slot)
