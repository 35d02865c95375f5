"""The health loop: a parent thread that measures the streams and acts on memory and stalls.

Every ``interval_s`` it measures the memory of the whole process tree, publishes each
stream's counters to the registry and emits ``health.checked``. Against the memory limit
it applies what :class:`~.scheduling.MemoryBreaker` decides: warn (``memory.warning``),
pause new batches (``memory.critical``, ``backpressure.on``), resume
(``backpressure.off``), or fail the streams with a ``ResourceError`` that says what to
change when memory stays critical although paused.

A stream that makes no progress for ``stall_timeout_s`` while nothing waits for its
caller fails with a clear error instead of hanging (:func:`~.scheduling.stalled`).
Process deaths are not its job: the dispatcher sees them at once on the children's pipes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

from ashstream import telemetry
from ashstream.chunks import unshared_memory_bytes
from ashstream.engines.local.scheduling import (
    CRITICAL_FRACTION,
    PAUSE_TIMEOUT_S,
    Breaker,
    MemoryBreaker,
)
from ashstream.engines.local.supervisor import Supervisor
from ashstream.errors import PipelineError, ResourceError
from ashstream.procs import default_memory_limit

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
STALL_TIMEOUT_S = 600.0  # a big ORDER BY can take minutes before its first row
PSS_EVERY_CHECKS = 10  # PSS walks every page table: exact, but too dear for each check


def tree_pss_bytes() -> int:
    """The proportional set size of the process tree: shared pages (libraries, arenas)
    split among the processes that map them. Exact, but it walks every page table, so the
    health loop takes it only every ``PSS_EVERY_CHECKS`` checks."""
    total = 0
    me = psutil.Process(os.getpid())
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class HealthLoop:
    """The thread that checks the pool every ``interval_s``; see the module's docstring."""

    def __init__(
        self,
        supervisor: Supervisor,
        interval_s: float = HEALTH_INTERVAL_S,
        memory_limit: int | None = None,
        pause_timeout_s: float = PAUSE_TIMEOUT_S,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ) -> None:
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.pool_memory_limit = memory_limit or default_memory_limit()
        self.stall_timeout_s = stall_timeout_s
        self.memory_bytes = 0  # the latest tree measurement, read by the progress display
        self.peak_memory_bytes = 0
        self.pss_bytes: int | None = None  # the latest (rare) PSS of the tree
        self._checks = 0
        self._breaker = MemoryBreaker(pause_timeout_s)
        self._check_failed = False  # the last check raised: warned once already
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ashstream-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def memory_limit(self) -> int:
        """The pool's limit, or a running report's ``pipeline.memory_limit`` if lower."""
        limits = [s.report.pipeline.memory_limit for s in self.supervisor.streams()]
        return min([self.pool_memory_limit, *(x for x in limits if x)])

    def check(self) -> None:
        """One round: measure, act on memory and stalls, publish. Runs in the health
        loop's thread (or a test's)."""
        streams = self.supervisor.streams()
        arenas = sum(s.arena.resident_bytes() for s in streams)
        self.memory_bytes = unshared_memory_bytes(children=True, shared_bytes=arenas)
        self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
        if self._checks % PSS_EVERY_CHECKS == 0:
            self.pss_bytes = tree_pss_bytes()
        self._checks += 1
        limit = self.memory_limit()
        now = time.monotonic()
        for action in self._breaker.step(self.memory_bytes, limit, now):
            self._apply(action, self.memory_bytes, limit)
        self._stalls(now)
        self.supervisor.memory = (self.memory_bytes, self.pss_bytes)
        self.supervisor.publish()
        telemetry.emit(
            "health.checked",
            {
                "memory_bytes": self.memory_bytes,
                "pss_bytes": self.pss_bytes,
                "memory_limit_bytes": limit,
                "streams": len(streams),
            },
        )
        for stream in streams:
            elapsed = time.time() - stream.started_at
            if elapsed > 0:
                telemetry.emit(
                    "throughput", {"rows_per_s": stream.rows / elapsed}, {"stream_id": stream.id}
                )

    def _apply(self, action: Breaker, used: int, limit: int) -> None:
        sizes = {"memory_bytes": used, "memory_limit_bytes": limit}
        if action is Breaker.WARN:
            telemetry.emit("memory.warning", sizes)
        elif action is Breaker.PAUSE:
            self.supervisor.pause_admission(True)
            telemetry.emit("memory.critical", sizes)
            telemetry.emit("backpressure.on", sizes, {"reason": "memory"})
        elif action is Breaker.GIVE_UP:
            self.supervisor.fail_all(
                ResourceError(
                    f"memory stayed at {used / 2**20:,.0f} MiB, over {CRITICAL_FRACTION:.0%} of "
                    f"the {limit / 2**20:,.0f} MiB limit, for "
                    f"{self._breaker.pause_timeout_s:g} s although no new batches were "
                    "started. Raise memory_limit, or use fewer workers or a smaller chunk_size."
                )
            )
        elif action is Breaker.RESUME:
            self.supervisor.pause_admission(False)
            telemetry.emit("backpressure.off", sizes, {"reason": "memory"})

    def _stalls(self, now: float) -> None:
        for stream in self.supervisor.stalled_streams(now, self.stall_timeout_s):
            if self.supervisor.paused:
                cause = (
                    "new batches were paused by the memory breaker all that time; raise "
                    "memory_limit, or use fewer workers or a smaller chunk_size"
                )
            else:
                cause = (
                    "the source or a transformer is stuck. If the source is sorted first "
                    "(groups, order_by) and very large, the sort may need longer before its "
                    "first row: raise stall_timeout_s"
                )
            self.supervisor.fail(
                stream,
                PipelineError(
                    f"stream {stream.id} made no progress for {self.stall_timeout_s:g} s "
                    f"(after {stream.rows} rows); {cause}"
                ),
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # a failed check must not end the checks that follow
                if not self._check_failed:
                    logger.warning(
                        "a health check failed (%s: %s); memory and stalls may go unwatched",
                        type(exc).__name__,
                        exc,
                    )
                self._check_failed = True
                logger.debug("health check failed", exc_info=True)
            else:
                self._check_failed = False
            self._stop.wait(self.interval_s)
