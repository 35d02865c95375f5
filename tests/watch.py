"""Waiting on what the pool says (telemetry), instead of on the clock."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ashstream import telemetry


class HealthChecks:
    """The health loop's ``health.checked`` events as they come: wait for the next ones,
    and the peak memory they measured since :meth:`reset_peak`."""

    def __init__(self) -> None:
        self._done = threading.Condition()
        self.count = 0
        self.peak_memory_bytes = 0

    def __enter__(self) -> HealthChecks:
        telemetry.attach("health.checked", self._on_check)
        return self

    def __exit__(self, *exc_info: object) -> None:
        telemetry.detach("health.checked", self._on_check)

    def _on_check(self, event: str, measurements: Mapping[str, Any], metadata: object) -> None:
        with self._done:
            self.count += 1
            self.peak_memory_bytes = max(self.peak_memory_bytes, measurements["memory_bytes"])
            self._done.notify_all()

    def wait(self, n: int = 1, timeout_s: float = 30.0) -> None:
        """Return once ``n`` more checks have run: the last of them began after this call
        when ``n`` is 2 or more."""
        with self._done:
            target = self.count + n
            assert self._done.wait_for(lambda: self.count >= target, timeout_s), "no check"

    def reset_peak(self) -> None:
        with self._done:
            self.peak_memory_bytes = 0


def segments_of_this_run() -> list[str]:
    """Our prefix's segments in /dev/shm, less those of another live process tree (a
    second test run on the machine): a segment named for a process that is gone, or for
    this process or one of its children, is this run's."""
    import os

    import psutil

    from ashstream.engines.local.shm import SEGMENT_PREFIX, our_segments

    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    kept = []
    for name in our_segments():
        owner = name[len(SEGMENT_PREFIX) :].split("_")[0]
        if not owner.isdigit() or int(owner) in ours or not psutil.pid_exists(int(owner)):
            kept.append(name)
    return kept
