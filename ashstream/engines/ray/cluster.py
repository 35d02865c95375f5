"""Joining a Ray cluster, or starting a local Ray for the run, and failing in one line
when neither works.

A local Ray that fails to come up (one of its own agents dies during start, its temp
folder cannot be written…) raises from ``ray.init`` after it has started some of its
processes, and before it recorded them anywhere ``ray.shutdown`` looks: :func:`connect`
stops those itself, so a failed start leaves no process behind in a caller that lives on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import ray

from ashstream.errors import PipelineError

logger = logging.getLogger(__name__)

# How long reaching a cluster's address may take before the run fails: ray.init itself
# retries an unreachable address for minutes.
CONNECT_TIMEOUT_S = 5.0
# How long the processes of a failed start get to exit on SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 5.0
# The raylet logs why it shut down on a line of its own (Ray 2.60), which says more
# than ray.init's "timed out during startup".
_RAYLET_REASON = 'reason_message: "'
# Ray's own processes that may be left as zombies of ours by a failed start.
_RAY_BINARIES = ("raylet", "gcs_server")


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str) -> None:
    """Fail at once, and clearly, when nothing answers at ``host:port`` (or
    ``ray://host:port``); ``auto`` is left to Ray, which fails fast without a cluster."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    advice = (
        "start one with `ray start --head`, or leave out --ray-address (and RAY_ADDRESS) "
        "to run on a Ray started for this run"
    )
    if not host or not port.isdigit():
        raise PipelineError(
            f"Ray address {address!r} is not host:port, ray://host:port or auto; {advice}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise PipelineError(f"cannot reach the Ray cluster at {address}: {exc}; {advice}") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray when it is None.

    Raises:
        PipelineError: in one line, when Ray cannot be reached, joined or started.
    """
    if address is not None:
        check_reachable(address)
    before = {child.pid for child in _children()}
    with _signal_handlers_kept():
        try:
            ray.init(
                # "local": a new Ray even when another runs on this machine
                # (without an address, ray.init would join the newest one).
                address=address or "local",
                include_dashboard=False if address is None else None,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except BaseException as exc:
            logs = _stop_failed_start(before) if address is None else None
            if not isinstance(exc, Exception):
                raise  # Ctrl-C while Ray started
            logger.debug("ray.init failed", exc_info=True)
            if address is not None:
                raise PipelineError(
                    f"cannot join the Ray cluster at {address}: {first_line(exc)}"
                ) from None
            raise PipelineError(_start_failure(exc, logs)) from None


def _start_failure(exc: BaseException, logs: str | None) -> str:
    """The one line a failed local start gets: Ray's reason, the raylet's if it left
    one, and where Ray's logs of the attempt are."""
    message = f"Ray could not start on this machine: {first_line(exc).rstrip('.')}"
    if logs is not None:
        reason = _raylet_reason(os.path.join(logs, "raylet.out"))
        if reason:
            message += f"; the raylet said: {reason}"
        message += f"; Ray's logs of the attempt are in {logs}"
    return message


def _stop_failed_start(before: set[int]) -> str | None:
    """Stop the processes a failed ``ray.init`` started (children of this process that
    run Ray's code, or Ray's binaries left as zombies), and reap them; the folder of
    their logs, as their command lines name it."""
    ray.shutdown()  # the driver's half-made state, if any; it never knew the processes
    ray_dir = os.path.dirname(ray.__file__)
    started, logs = [], None
    for child in _children():
        if child.pid in before:
            continue
        try:
            command = child.cmdline()
        except psutil.ZombieProcess:
            command = []
            if _name(child) not in _RAY_BINARIES:
                continue
        except psutil.Error:
            continue  # gone meanwhile
        if command and not any(arg.startswith(ray_dir) for arg in command):
            continue  # the caller's, started by another thread
        started.append(child)
        for arg in command:
            name, _, value = arg.partition("=")
            if logs is None and name in ("--log_dir", "--logs-dir"):
                logs = value
    for process in started:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(started, timeout=STOP_TIMEOUT_S)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
    return logs


def _raylet_reason(log_file: str) -> str | None:
    """The last shutdown reason the raylet wrote in ``log_file``, if any."""
    try:
        with open(log_file, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 2**16))  # the end is enough
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    reasons = [line for line in lines if line.startswith(_RAYLET_REASON)]
    return reasons[-1].removeprefix(_RAYLET_REASON).rstrip('".') if reasons else None


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.Error:
        pass  # gone already


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """ray.init replaces the handlers of SIGINT and SIGTERM (its C++ core aborts the
    process with a stack dump on SIGTERM); the caller's handlers, the CLI's clean
    cancel among them, are put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


def first_line(exc: BaseException) -> str:
    """The first line of an error from Ray, whose messages run to many lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
