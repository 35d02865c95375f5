"""Every decision the dispatcher and the health loop make, as plain functions of plain values.

No processes, no locks, no clocks: a time is an argument. Kept apart from the loops so
that each rule is tested with numbers (as Ray Data keeps its executor's scheduling state
apart from the loop), and the loops only apply what comes back:

* **admission**: which queued stream may open its source now (:func:`admission_pick`);
* **the dispatch plan**: which transformer gets the next batch of which stream
  (:func:`dispatch_plan`);
* **deaths**: what a child's death means for the pool (:func:`death_action`), and what
  becomes of each batch a dead transformer held (:func:`triage`);
* **stalls**: when a stream that makes no progress has failed (:func:`stalled`);
* **memory**: the breaker's hysteresis (:class:`MemoryBreaker`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# As Dask's allowed-failures: a batch that killed this many transformers is not retried.
MAX_BATCH_KILLS = 3
# At most this many child restarts within the window, then the pool gives up (OTP's
# default intensity is 3 in 5 s; data work restarts less eagerly).
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
# Batches a lone stream may have in flight beyond one per transformer; each costs two
# slots of its arena (an input and a result).
EXTRA_WINDOW = 2
# Tasks handed to one transformer before it finishes the first: 2 hides the round trip
# through the dispatcher without letting one slow transformer hoard batches.
TASKS_PER_TRANSFORMER = 2
# A reading stream whose finished results have waited this long for its caller counts as
# waiting on the caller (see may_start_reading); shorter waits are the caller between
# two chunks, or a sink taking its time.
CALLER_WAIT_S = 0.5
# ... this long, when a queued stream's own caller is waiting for it: the caller may be
# reading the streams in turn, and nothing moves until the queued one starts.
CALLER_WAITS_FOR_QUEUED_S = 0.05
# The memory breaker's levels, as fractions of the limit.
WARNING_FRACTION = 0.8
CRITICAL_FRACTION = 0.95
PAUSE_TIMEOUT_S = 30.0  # critical this long with admission paused: give up


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


# ---------------------------------------------------------------- admission


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


def admission_pick(
    limit: int,
    readers_waited_s: Sequence[float | None],
    awaited: int | None,
    caller_wait_s: float = CALLER_WAIT_S,
) -> int | None:
    """The position in the queue of the stream that may open its source now, or None.

    Args:
        limit: max_reading_streams.
        readers_waited_s: for each stream reading now, how long every one of its result
            slots has held a finished batch for its caller; None while it can still do
            something without its caller (a free result slot, a batch in flight).
        awaited: the position of the first queued stream whose own caller waits for it.
        caller_wait_s: how long the readers must have waited when no caller awaits.

    Below the limit the queue moves in order; past it, only once every reader has waited
    on its caller, and the awaited stream first (after CALLER_WAITS_FOR_QUEUED_S)."""
    patience_s = caller_wait_s if awaited is None else CALLER_WAITS_FOR_QUEUED_S
    every_reader_waits = all(w is not None and w > patience_s for w in readers_waited_s)
    if not may_start_reading(len(readers_waited_s), limit, every_reader_waits):
        return None
    return awaited if len(readers_waited_s) >= limit and awaited is not None else 0


def least_loaded(loads: Sequence[int]) -> int:
    """The index of the first of the smallest ``loads``: the producer a new stream goes to."""
    return min(range(len(loads)), key=loads.__getitem__)


# ---------------------------------------------------------------- the dispatch plan


@dataclass(frozen=True)
class Backlog:
    """A stream's work waiting for a transformer, as counts."""

    retry: int  # batches of dead transformers, to dispatch again (they keep their slot)
    ready: int  # batches produced and not dispatched yet
    free_results: int  # result slots free: a new batch needs one


def round_robin(items: Sequence, turn: int) -> list:
    """``items`` starting at position ``turn`` (mod their number), wrapping around: each
    stream gets its turn to go first, so none starves another."""
    if not items:
        return []
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def dispatch_plan(
    loads: Sequence[int | None],
    backlogs: Sequence[Backlog],
    turn: int,
    per_transformer: int = TASKS_PER_TRANSFORMER,
) -> tuple[list[tuple[int, int, bool]], int]:
    """Which batches go out now, and to whom.

    Args:
        loads: tasks each transformer holds; None for one not ready yet.
        backlogs: each stream's waiting work.
        turn: the round-robin counter; each pick (and a failed one) advances it.

    Returns:
        ``(transformer, stream, from_retry)`` in the order to send them, and the new
        turn. Least loaded transformers are filled first, up to ``per_transformer``
        tasks each; a stream's retries go before its new batches, which need a free
        result slot."""
    retry = [b.retry for b in backlogs]
    ready = [b.ready for b in backlogs]
    free = [b.free_results for b in backlogs]
    plan: list[tuple[int, int, bool]] = []
    order = sorted(range(len(loads)), key=lambda i: loads[i] or 0)
    for transformer in order:
        load = loads[transformer]
        while load is not None and load < per_transformer:
            picked = None
            for stream in round_robin(range(len(backlogs)), turn):
                if retry[stream]:
                    retry[stream] -= 1
                    picked = (transformer, stream, True)
                elif ready[stream] and free[stream]:
                    ready[stream] -= 1
                    free[stream] -= 1
                    picked = (transformer, stream, False)
                else:
                    continue
                break
            turn += 1
            if picked is None:
                return plan, turn
            plan.append(picked)
            load += 1
    return plan, turn


# ---------------------------------------------------------------- deaths


@dataclass(frozen=True)
class DeathAction:
    """What a child's death means, in the order the dispatcher applies it."""

    give_up: bool  # the restart budget is spent: the pool is broken
    fail_streams: bool  # a producer's: its unfinished streams fail (no source is re-read)
    redispatch: bool  # a transformer's: its batches are triaged (see triage)
    replace: bool  # a new process takes its slot


def death_action(role: str, affordable: bool, closing: bool) -> DeathAction:
    """``affordable``: the restart budget allows one more; ``closing``: the pool is
    being closed, so nothing is replaced (close stops the others)."""
    if not affordable:
        return DeathAction(give_up=True, fail_streams=False, redispatch=False, replace=False)
    producer = role == "producer"
    return DeathAction(False, producer, not producer, not closing)


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


def triage(kills_before: Sequence[int], poison_policy: str) -> list[tuple[int, LostBatch]]:
    """The fate of each batch a dead transformer held, in the order it was given them.

    ``kills_before``: transformers each batch had killed before this one. Returns each
    batch's kills now (the running one's counts this death) and what becomes of it."""
    fates = []
    for position, kills in enumerate(kills_before):
        kills += suspected(position)
        fates.append((kills, lost_batch_action(kills, poison_policy)))
    return fates


# ---------------------------------------------------------------- stalls


def waited_on_caller_s(
    free_results: int, in_flight: int, retry: int, idle_s: float
) -> float | None:
    """How long a stream has waited on its caller alone: every result slot holds a
    finished batch, and it has made no progress for ``idle_s``. None when it can still
    do something without its caller."""
    return idle_s if not free_results and not in_flight and not retry else None


def stalled(started: bool, caller_can_take: bool, idle_s: float, timeout_s: float) -> bool:
    """Whether a stream with no progress for ``idle_s`` has stalled: it left the queue
    (``started``; a queued stream waits its turn) and its caller has nothing to take
    (else the wait is the caller's). A pause that never ends counts as a stall too."""
    return started and not caller_can_take and idle_s > timeout_s


# ---------------------------------------------------------------- memory


class Breaker(enum.Enum):
    """What the memory breaker asks for, in the order it is to be done."""

    WARN = "warn"  # memory.warning
    PAUSE = "pause"  # stop starting new batches: memory.critical, backpressure.on
    GIVE_UP = "give_up"  # fail every stream: critical for too long although paused
    RESUME = "resume"  # start new batches again: backpressure.off


class MemoryBreaker:
    """A circuit breaker with hysteresis over the process tree's memory.

    It warns on crossing WARNING_FRACTION of the limit, pauses at CRITICAL_FRACTION,
    resumes only below WARNING_FRACTION, and gives up when memory stays critical for
    ``pause_timeout_s`` although paused (results keep draining while paused, so memory
    can only go down unless something else holds it)."""

    def __init__(self, pause_timeout_s: float = PAUSE_TIMEOUT_S) -> None:
        self.pause_timeout_s = pause_timeout_s
        self.warned = False  # above the warning level at the last step
        self.paused_since: float | None = None  # when it paused; None while not paused

    def step(self, used: int, limit: int, now: float) -> list[Breaker]:
        """One measurement: ``used`` bytes of ``limit`` at ``now`` (seconds)."""
        fraction = used / limit
        actions = [Breaker.WARN] if fraction >= WARNING_FRACTION and not self.warned else []
        self.warned = fraction >= WARNING_FRACTION
        if self.paused_since is None:
            if fraction >= CRITICAL_FRACTION:
                self.paused_since = now
                actions.append(Breaker.PAUSE)
        elif fraction < WARNING_FRACTION:
            self.paused_since = None
            actions.append(Breaker.RESUME)
        elif fraction >= CRITICAL_FRACTION and now - self.paused_since > self.pause_timeout_s:
            self.paused_since = None
            actions += [Breaker.GIVE_UP, Breaker.RESUME]
        return actions
