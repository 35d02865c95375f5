"""The registry of streams: a ``multiprocessing.Manager`` dict, stream id → plain dict.

Written on status changes and by the health loop about once a second, never per chunk: a
Manager access is a round trip to another process. Readers get snapshots.
"""

from __future__ import annotations

import signal
from multiprocessing.context import BaseContext
from multiprocessing.managers import SyncManager
from typing import Any

STATUSES = ("starting", "running", "paused", "completed", "failed", "cancelled")


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the Manager must outlive it so that the
    # parent can still record the streams as cancelled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Registry:
    def __init__(self, ctx: BaseContext) -> None:
        self._manager = SyncManager(ctx=ctx)
        self._manager.start(_ignore_sigint)
        self._streams = self._manager.dict()

    def put(self, stream_id: str, entry: dict[str, Any]) -> None:
        self._streams[stream_id] = dict(entry)

    def update(self, stream_id: str, **changes: Any) -> None:
        entry = dict(self._streams.get(stream_id, {}))
        entry.update(changes)
        self._streams[stream_id] = entry

    def get(self, stream_id: str) -> dict[str, Any] | None:
        entry = self._streams.get(stream_id)
        return dict(entry) if entry is not None else None

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        entries = [dict(e) for e in self._streams.values()]
        return [e for e in entries if status is None or e.get("status") == status]

    def close(self) -> None:
        self._manager.shutdown()
