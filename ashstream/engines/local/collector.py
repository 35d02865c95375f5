"""Results back in source order: a stream's finished batches wait here, in any order,
until the caller takes them in ``seq`` order and they are cut into chunks.

The window is bounded by the arena (a batch is dispatched only with a free result slot,
and the oldest undelivered batch always holds one), so waiting here cannot deadlock.
"""

from __future__ import annotations

from ashstream.engines.local.comms import BatchReady, TaskDone


class ResultOrder:
    """One stream's finished batches, handed out in ``seq`` order. Not thread-safe: the
    supervisor's lock guards it."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[BatchReady, TaskDone]] = {}  # seq -> batch, its result
        self.next_seq = 0  # the batch the caller gets next
        self.total_batches: int | None = None  # known once the source is done

    def put(self, batch: BatchReady, result: TaskDone) -> None:
        self.done[batch.seq] = (batch, result)

    def next_ready(self) -> bool:
        """The caller could take a batch now: a stall here is the caller's, not ours."""
        return self.next_seq in self.done

    def take(self) -> tuple[BatchReady, TaskDone]:
        """The next batch in order; call only when :meth:`next_ready`."""
        return self.done.pop(self.next_seq)

    def taken(self) -> None:
        """The caller has every chunk of the batch it took."""
        self.next_seq += 1

    def finished(self) -> bool:
        return self.total_batches is not None and self.next_seq >= self.total_batches
