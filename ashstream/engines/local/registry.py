"""The registry of streams: a ``multiprocessing.Manager`` dict, stream id → plain dict.

Written on status changes and by the health loop about once a second, never per chunk: a
Manager access is a round trip to another process. Readers get snapshots.

Other processes of the same user reach it too (``ashstream status``): each pool writes
the Manager's Unix socket address and a random authkey to a 0600 file in a 0700
runtime directory (:mod:`ashstream.status_files`), and removes the file when it closes.
A file whose pool is gone is stale and is removed by the next reader. A Manager's
replies are pickles, and unpickling one runs what it says: a reader connects only to
a socket of this user with a process of this user listening (``SO_PEERCRED``).

The registry is best-effort: the pool keeps its own copy of every entry and reads that,
and the Manager only publishes it to other processes. If the Manager process dies (or
never starts), one warning is logged, the streams run on, and ``ashstream status`` says
that pool's registry is unreachable.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import stat
import struct
from collections.abc import Callable
from multiprocessing import AuthenticationError, connection, managers
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.managers import DictProxy, SyncManager
from typing import Any

from ashstream.engines.local.child import Faults, become_child
from ashstream.procs import pid_alive
from ashstream.status_files import new_status_file, read_status_files, remove_status_file
from ashstream.stream_record import completed

logger = logging.getLogger(__name__)


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
        self._file: str | None = None  # the status file's name
        self._streams: Any = None
        authkey = secrets.token_bytes(32)
        self._manager = RegistryManager(ctx=ctx, authkey=authkey)
        try:
            faults = Faults.from_environment("registry", 0)
            self._manager.start(_registry_process, (lifeline, pool_id, faults))
            self._streams = self._manager.streams()
        except (OSError, EOFError) as exc:  # no Manager
            self.close()
            self._unreachable(exc)
            return
        try:
            self._file = self._advertise(authkey)
        except OSError as exc:  # no place to say where it is (or one another user planted)
            logger.warning("`ashstream status` cannot list this pool's streams: %s", exc)

    def _advertise(self, authkey: bytes) -> str:
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
            try:
                remove_status_file(self._file)
            except OSError as exc:  # the directory was swapped meanwhile: not ours to fix
                logger.debug("cannot remove the status file %s: %s", self._file, exc)
        try:
            self._manager.shutdown()
        except (AttributeError, OSError, EOFError):
            pass  # never started, or already gone


class NotOurs(PermissionError):
    """A registry address that another user's process answers, or could."""


def own_client(address: object, family: object = None, authkey: bytes | None = None) -> Connection:
    """``multiprocessing.connection.Client`` for a Manager's Unix socket, refusing one
    that is not this user's: the socket file must be ours, and so the process that
    accepted the connection (its credentials, ``SO_PEERCRED``, checked on the
    connected socket itself, so no swap in between can fool it)."""
    if not isinstance(address, str) or not address.startswith("/"):
        raise NotOurs(f"{address!r} is not the path of a Unix socket")
    info = os.lstat(address)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise NotOurs(f"{address} is not a socket of this user")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid != os.getuid():
            raise NotOurs(f"the process listening at {address} runs as uid {uid}")
        conn = Connection(sock.detach())
    if authkey is not None:  # as multiprocessing.connection.Client does
        connection.answer_challenge(conn, authkey)
        connection.deliver_challenge(conn, authkey)
    return conn


# A Manager (and its proxies) made with this serializer connects through own_client;
# the wire format is pickle's, as the registry's own server speaks.
OWN_SERIALIZER = "ashstream-own"
managers.listener_client[OWN_SERIALIZER] = (connection.Listener, own_client)


def running_pools() -> list[dict[str, Any]]:
    """The pools of this user that are running now, with their streams.

    Each entry: pid, started_at, streams (registry entries), and ``registry``:
    ``"ok"``, or ``"unreachable"`` when the pool lives but its Manager does not answer
    (or is not this user's).

    Raises:
        ashstream.status_files.UntrustedDirectory: the status directory is not ours."""
    pools = []
    for info in read_status_files():
        try:
            pool = {
                "pid": info["pid"],
                "started_at": float(info["started_at"]),
                "engine": str(info.get("engine", "local")),
                "registry": "ok",
            }
        except (KeyError, TypeError, ValueError):
            continue  # not a status file of this version
        if "streams" in info:  # an engine that writes its streams into the file
            pool["streams"] = [completed(s) for s in info["streams"] if isinstance(s, dict)]
            pools.append(pool)
            continue
        try:
            address, authkey = str(info["address"]), bytes.fromhex(str(info["authkey"]))
        except (KeyError, ValueError):
            continue  # not a status file of this version
        try:
            manager = RegistryManager(address=address, authkey=authkey, serializer=OWN_SERIALIZER)
            manager.connect()
            pool["streams"] = [completed(dict(e)) for e in manager.streams().values()]
        except (OSError, EOFError, AuthenticationError, managers.RemoteError) as exc:
            logger.debug("registry of pool %s unreachable: %s", info["pid"], exc)
            if not pid_alive(info["pid"]):
                continue  # the pool closed meanwhile
            pool["registry"], pool["streams"] = "unreachable", []
        pools.append(pool)
    return pools
