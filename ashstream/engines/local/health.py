"""The health loop: a parent thread that measures the streams and acts on memory and stalls.

Every ``interval_s`` it measures the memory of the whole process tree, publishes each
stream's counters to the registry and emits ``health.checked``. Against the memory
limit it works like a circuit breaker with hysteresis:

* at ``WARNING_FRACTION`` (0.8) of the limit it warns (``memory.warning``);
* at ``CRITICAL_FRACTION`` (0.95) it pauses admission of new batches (``memory.critical``,
  ``backpressure.on``); results keep draining, so memory can only go down;
* it resumes when memory falls below the warning level (``backpressure.off``);
* if memory stays critical for ``pause_timeout_s`` even so, it fails the streams with a
  ``ResourceError`` that says what to change.

A stream that makes no progress for ``stall_timeout_s`` while nothing waits for its
caller fails with a clear error instead of hanging. Process deaths are not its job: the
supervisor sees them at once through process sentinels.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psutil

from ashstream import telemetry
from ashstream.engines.local.supervisor import Supervisor
from ashstream.errors import PipelineError, ResourceError

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
WARNING_FRACTION = 0.8
CRITICAL_FRACTION = 0.95
PAUSE_TIMEOUT_S = 30.0  # critical this long with admission paused: give up
STALL_TIMEOUT_S = 600.0  # a big ORDER BY can take minutes before its first row
PSS_EVERY_CHECKS = 10


def tree_memory_bytes(arena_bytes: int = 0) -> int:
    """Memory of this process and its children without counting shared memory twice:
    the sum of (RSS - shared) per process, plus the arenas once. Cheap (statm only)."""
    total = arena_bytes
    me = psutil.Process(os.getpid())
    for process in [me, *me.children(recursive=True)]:
        try:
            info = process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += max(info.rss - getattr(info, "shared", 0), 0)
    return total


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


def default_memory_limit() -> int:
    """The cgroup's memory limit when there is one (containers), else the machine's RAM."""
    candidates = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    for path in candidates:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return psutil.virtual_memory().total


class HealthLoop:
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
        self.pause_timeout_s = pause_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.memory_bytes = 0  # the latest tree measurement, read by the progress display
        self.peak_memory_bytes = 0
        self.pss_bytes: int | None = None  # the latest (rare) PSS of the tree
        self._checks = 0
        self._warned = False  # above the warning level at the last check
        self._paused_since: float | None = None  # monotonic time admission was paused
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
        streams = self.supervisor.streams()
        self.memory_bytes = tree_memory_bytes(sum(s.arena.resident_bytes() for s in streams))
        self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
        if self._checks % PSS_EVERY_CHECKS == 0:
            self.pss_bytes = tree_pss_bytes()
        self._checks += 1
        limit = self.memory_limit()
        self._breaker(self.memory_bytes, limit)
        self._stalls(time.monotonic())
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

    def _breaker(self, used: int, limit: int) -> None:
        sizes = {"memory_bytes": used, "memory_limit_bytes": limit}
        fraction = used / limit
        if fraction >= WARNING_FRACTION and not self._warned:
            telemetry.emit("memory.warning", sizes)
        self._warned = fraction >= WARNING_FRACTION
        if self._paused_since is None:
            if fraction >= CRITICAL_FRACTION:
                self._paused_since = time.monotonic()
                self.supervisor.pause_admission(True)
                telemetry.emit("memory.critical", sizes)
                telemetry.emit("backpressure.on", sizes, {"reason": "memory"})
            return
        if fraction < WARNING_FRACTION:
            self._paused_since = None
            self.supervisor.pause_admission(False)
            telemetry.emit("backpressure.off", sizes, {"reason": "memory"})
        elif (
            fraction >= CRITICAL_FRACTION
            and time.monotonic() - self._paused_since > self.pause_timeout_s
        ):
            self.supervisor.fail_all(
                ResourceError(
                    f"memory stayed at {used / 2**20:,.0f} MiB, over {CRITICAL_FRACTION:.0%} of "
                    f"the {limit / 2**20:,.0f} MiB limit, for {self.pause_timeout_s:g} s "
                    "although no new batches were started. Raise memory_limit, or use fewer "
                    "workers or a smaller chunk_size."
                )
            )
            self._paused_since = None
            self.supervisor.pause_admission(False)
            telemetry.emit("backpressure.off", sizes, {"reason": "memory"})

    def _stalls(self, now: float) -> None:
        for stream in self.supervisor.stalled_streams(now - self.stall_timeout_s):
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
