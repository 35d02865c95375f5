"""The supervisor's decisions, as plain functions of plain values: no processes, no clocks.

Kept apart from the dispatcher loop so that each rule is tested with numbers (as Ray
Data's executor keeps its scheduling state): how many restarts the pool may still
afford, what becomes of a batch whose transformer died, which batch goes out next.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence

# As Dask's allowed-failures: a batch that killed this many transformers is not retried.
MAX_BATCH_KILLS = 3
# At most this many child restarts within the window, then the pool gives up (OTP's
# default intensity is 3 in 5 s; data work restarts less eagerly).
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
# Batches a lone stream may have in flight beyond one per transformer; each costs two
# slots of its arena (an input and a result).
EXTRA_WINDOW = 2


class RestartBudget:
    """Restart intensity, as OTP supervisors have: deaths within a sliding window."""

    def __init__(self, max_restarts: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.total = 0  # deaths since the pool started
        self._deaths: deque[float] = deque()  # times of the deaths within the window

    def record_death(self, now: float) -> bool:
        """Count a child's death at ``now``; True while a replacement is affordable."""
        self.total += 1
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window_s:
            self._deaths.popleft()
        return len(self._deaths) <= self.max_restarts

    @property
    def in_window(self) -> int:
        return len(self._deaths)


class LostBatch(enum.Enum):
    """What becomes of a batch a transformer held when it died."""

    RETRY = "retry"  # dispatch it again
    SKIP = "skip"  # leave its rows out and say so (poison_policy="skip")
    FAIL = "fail"  # fail its stream, naming its rows


def suspected(position: int) -> bool:
    """A transformer works through its tasks in order: only its oldest one (position 0)
    was running when it died, so only that batch is suspected of killing it."""
    return position == 0


def lost_batch_action(kills: int, poison_policy: str) -> LostBatch:
    """``kills``: transformers that died while this batch was the one running."""
    if kills < MAX_BATCH_KILLS:
        return LostBatch.RETRY
    return LostBatch.SKIP if poison_policy == "skip" else LostBatch.FAIL


def round_robin(items: Sequence, turn: int) -> list:
    """``items`` starting at position ``turn`` (mod their number), wrapping around: each
    stream gets its turn to go first, so none starves another."""
    if not items:
        return []
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def stream_window(transformers: int, open_streams: int) -> int:
    """Batches in flight for a stream opened beside ``open_streams`` others: a lone stream
    keeps every transformer busy with room to spare; streams opened beside others share
    that room, down to one batch each (an input slot and a result slot: the least that
    cannot deadlock), so twenty streams do not touch twenty full arenas. The transformers
    stay busy: the streams together keep enough batches in flight."""
    return max(1, (transformers + EXTRA_WINDOW) // (open_streams + 1))


def reading_streams_limit(transformers: int) -> int:
    """Streams whose sources are open at once, by default. An open Parquet scan holds
    ~25 MB of DuckDB's state in the producer, whatever the batch size, and two streams
    per transformer keep the transformers as busy as twenty do."""
    return 2 * transformers


def may_start_reading(reading: int, limit: int, all_wait_on_callers: bool) -> bool:
    """Whether a queued stream may open its source now: while fewer than ``limit``
    streams read, or when every reading stream waits on its caller. That caller may be
    waiting on the queued stream (one thread reading several streams in turn), so a
    queue that waited then would never move."""
    return reading < limit or all_wait_on_callers
