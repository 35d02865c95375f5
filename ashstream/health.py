"""The health loop: a parent thread that measures the streams and publishes them.

Every ``interval_s`` it copies each stream's counters into the registry and measures the
memory of the process tree. It observes; it never kills (the supervisor acts on deaths,
which it sees through process sentinels at once).
"""

from __future__ import annotations

import os
import threading

import psutil

from ashstream.supervisor import Supervisor

HEALTH_INTERVAL_S = 1.0


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


class HealthLoop:
    def __init__(self, supervisor: Supervisor, interval_s: float = HEALTH_INTERVAL_S) -> None:
        self.supervisor = supervisor
        self.interval_s = interval_s
        self.memory_bytes = 0  # the latest tree measurement, read by the progress display
        self.peak_memory_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ashstream-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def check(self) -> None:
        streams = self.supervisor.streams()
        self.memory_bytes = tree_memory_bytes(sum(s.arena.resident_bytes() for s in streams))
        self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
        self.supervisor.publish()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except (OSError, EOFError):
                return  # the registry's Manager is gone: the pool is closing
            self._stop.wait(self.interval_s)
