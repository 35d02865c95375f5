"""The registry of streams: a ``multiprocessing.Manager`` dict, stream id → plain dict.

Written on status changes and by the health loop about once a second, never per chunk: a
Manager access is a round trip to another process. Readers get snapshots.

Other processes of the same user reach it too (``ashstream status``): each pool writes
the Manager's Unix socket address and a random authkey to a 0600 file in a 0700
runtime directory, and removes the file when it closes. A file whose pool is gone is
stale and is removed by the next reader.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import time
from multiprocessing.context import BaseContext
from multiprocessing.managers import DictProxy, SyncManager
from pathlib import Path
from typing import Any

STATUSES = ("starting", "running", "paused", "completed", "failed", "cancelled")

_streams: dict[str, dict[str, Any]] = {}  # lives in the Manager's server process


def _streams_dict() -> dict[str, dict[str, Any]]:
    return _streams


class RegistryManager(SyncManager):
    """A SyncManager that serves one named dict, so other processes can find it."""


RegistryManager.register("streams", callable=_streams_dict, proxytype=DictProxy)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the Manager must outlive it so that the
    # parent can still record the streams as cancelled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def runtime_dir() -> Path:
    """This user's private directory for the registries' addresses (mode 0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"ashstream-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid() or path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} must belong to this user and be private (0700)")
    return path


class Registry:
    def __init__(self, ctx: BaseContext) -> None:
        authkey = secrets.token_bytes(32)
        self._manager = RegistryManager(ctx=ctx, authkey=authkey)
        self._manager.start(_ignore_sigint)
        self._streams = self._manager.streams()
        self._file = runtime_dir() / f"{os.getpid()}-{secrets.token_hex(4)}.json"
        descriptor = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "address": self._manager.address,
                    "authkey": authkey.hex(),
                    "started_at": time.time(),
                },
                f,
            )

    def put(self, stream_id: str, entry: dict[str, Any]) -> None:
        self._streams[stream_id] = dict(entry)

    def get(self, stream_id: str) -> dict[str, Any] | None:
        entry = self._streams.get(stream_id)
        return dict(entry) if entry is not None else None

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        entries = [dict(e) for e in self._streams.values()]
        return [e for e in entries if status is None or e.get("status") == status]

    def close(self) -> None:
        self._file.unlink(missing_ok=True)
        self._manager.shutdown()


def running_pools() -> list[dict[str, Any]]:
    """The pools of this user that are running now, with their streams.

    Each entry: pid, started_at and streams (registry entries). Files of pools whose
    process is gone are removed."""
    pools = []
    for path in sorted(runtime_dir().glob("*.json")):
        try:
            info = json.loads(path.read_text())
            os.kill(info["pid"], 0)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a dead pool's, or unreadable: stale
            continue
        try:
            manager = RegistryManager(
                address=info["address"], authkey=bytes.fromhex(info["authkey"])
            )
            manager.connect()
            streams = [dict(e) for e in manager.streams().values()]
        except (OSError, EOFError):
            continue  # closing right now
        pools.append({"pid": info["pid"], "started_at": info["started_at"], "streams": streams})
    return pools
