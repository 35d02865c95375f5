"""The registry of streams: a ``multiprocessing.Manager`` dict, stream id → plain dict.

Written on status changes and by the health loop about once a second, never per chunk: a
Manager access is a round trip to another process. Readers get snapshots.

Other processes of the same user reach it too (``ashstream status``): each pool writes
the Manager's Unix socket address and a random authkey to a 0600 file in a 0700
runtime directory, and removes the file when it closes. A file whose pool is gone is
stale and is removed by the next reader.

The registry is best-effort: the pool keeps its own copy of every entry and reads that,
and the Manager only publishes it to other processes. If the Manager process dies (or
never starts), one warning is logged, the streams run on, and ``ashstream status`` says
that pool's registry is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.managers import DictProxy, SyncManager
from pathlib import Path
from typing import Any

from ashstream.engines.local.child import Faults, become_child
from ashstream.procs import pid_alive
from ashstream.status_files import new_status_file, runtime_dir

logger = logging.getLogger(__name__)

STATUSES = ("queued", "starting", "running", "paused", "completed", "failed", "cancelled")
ACTIVE = STATUSES[:4]  # a stream in one of these is in progress

_streams: dict[str, dict[str, Any]] = {}  # lives in the Manager's server process


def _streams_dict() -> dict[str, dict[str, Any]]:
    return _streams


class RegistryManager(SyncManager):
    """A SyncManager that serves one named dict, so other processes can find it."""


RegistryManager.register("streams", callable=_streams_dict, proxytype=DictProxy)


def _registry_process(lifeline: Connection, pool_id: str, faults: Faults) -> None:
    """Runs first in the Manager's process: named in ``ps``, deaf to Ctrl-C (the parent
    must still be able to record the streams as cancelled), gone with the pool."""
    become_child("registry", None, pool_id, lifeline)
    if faults.crash_at_start:
        os.kill(os.getpid(), signal.SIGKILL)


class Registry:
    """The pool's streams: read from this process's copy, published through the Manager."""

    def __init__(self, ctx: BaseContext, lifeline: Connection, pool_id: str) -> None:
        self._entries: dict[str, dict[str, Any]] = {}  # the truth, in this process
        self.reachable = True  # False once the Manager failed: publish no more
        self._file: Path | None = None
        self._streams: Any = None
        authkey = secrets.token_bytes(32)
        self._manager = RegistryManager(ctx=ctx, authkey=authkey)
        try:
            faults = Faults.from_environment("registry", 0)
            self._manager.start(_registry_process, (lifeline, pool_id, faults))
            self._streams = self._manager.streams()
            self._file = self._advertise(authkey)
        except (OSError, EOFError) as exc:  # no Manager, or no place to say where it is
            self.close()
            self._unreachable(exc)

    def _advertise(self, authkey: bytes) -> Path:
        """Write where the Manager listens, for ``ashstream status``; its path."""
        return new_status_file(
            {"engine": "local", "address": self._manager.address, "authkey": authkey.hex()}
        )

    def put(self, stream_id: str, entry: dict[str, Any]) -> None:
        entry = dict(entry)
        self._entries[stream_id] = entry
        self._publish(lambda: self._streams.__setitem__(stream_id, entry))

    def get(self, stream_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(stream_id)
        return dict(entry) if entry is not None else None

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        entries = [dict(e) for e in list(self._entries.values())]
        return [e for e in entries if status is None or e.get("status") == status]

    def _publish(self, write: Callable[[], object]) -> None:
        if not self.reachable:
            return
        try:
            write()
        except (OSError, EOFError) as exc:  # the Manager died: a broken or refused socket
            self._unreachable(exc)

    def _unreachable(self, exc: BaseException) -> None:
        self.reachable = False
        logger.warning(
            "the registry process is gone (%s: %s); the streams run on, but "
            "`ashstream status` cannot follow this pool any more",
            type(exc).__name__,
            exc,
        )
        logger.debug("registry failure", exc_info=exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
        try:
            self._manager.shutdown()
        except (AttributeError, OSError, EOFError):
            pass  # never started, or already gone


def running_pools() -> list[dict[str, Any]]:
    """The pools of this user that are running now, with their streams.

    Each entry: pid, started_at, streams (registry entries), and ``registry``:
    ``"ok"``, or ``"unreachable"`` when the pool lives but its Manager does not answer.
    Files of pools whose process is gone are removed."""
    pools = []
    for path in sorted(runtime_dir().glob("*.json")):
        try:
            info = json.loads(path.read_text())
            stale = not pid_alive(info["pid"])
        except FileNotFoundError:
            continue  # closed meanwhile
        except (OSError, ValueError, KeyError):
            stale = True  # unreadable
        if stale:
            path.unlink(missing_ok=True)
            continue
        pool = {
            "pid": info["pid"],
            "started_at": info["started_at"],
            "engine": info.get("engine", "local"),
            "registry": "ok",
        }
        if "streams" in info:  # an engine that writes its streams into the file
            pool["streams"] = info["streams"]
            pools.append(pool)
            continue
        try:
            manager = RegistryManager(
                address=info["address"], authkey=bytes.fromhex(info["authkey"])
            )
            manager.connect()
            pool["streams"] = [dict(e) for e in manager.streams().values()]
        except (OSError, EOFError):
            if not path.exists():
                continue  # the pool closed meanwhile
            pool["registry"], pool["streams"] = "unreachable", []
        pools.append(pool)
    return pools
