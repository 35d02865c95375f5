"""Telemetry: named events with measurements and metadata, fanned out to handlers.

Handlers attach per event name (or ``"*"`` for all) and are called in the thread that
emits, so they must be quick. A handler that raises is logged and skipped: telemetry
never breaks a stream. Every event also goes to the ``ashstream.telemetry`` logger with
its fields as structured ``extra`` data.

    from ashstream import telemetry

    def on_batch(event, measurements, metadata):
        print(metadata["stream_id"], measurements["rows"])

    telemetry.attach("batch.done", on_batch)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["EVENTS", "Handler", "attach", "detach", "emit", "stream_events"]

# Event names: <component>.<what happened>. Measurements carry units in their names.
EVENTS = (
    "pipeline.started",  # metadata: stream_id, report
    "pipeline.stopped",  # measurements: rows, chunks, duration_s; metadata: status
    "pipeline.failed",  # metadata: stream_id, error, error_type
    "batch.done",  # measurements: rows, bytes; metadata: stream_id, seq
    "process.restarted",  # metadata: role, index, exit_code, pid (of the replacement)
    "batch.quarantined",  # metadata: stream_id, first_row, last_row, policy
    "health.checked",  # measurements: memory_bytes, memory_limit_bytes, rows_per_s
    "memory.warning",  # measurements: memory_bytes, memory_limit_bytes
    "memory.critical",  # same; admission of new batches pauses
    "backpressure.on",  # metadata: reason ("memory")
    "backpressure.off",
    "throughput",  # measurements: rows_per_s; metadata: stream_id
)

Handler = Callable[[str, Mapping[str, Any], Mapping[str, Any]], None]

logger = logging.getLogger("ashstream.telemetry")
_lock = threading.Lock()
_handlers: dict[str, tuple[Handler, ...]] = {}  # copy-on-write: emit reads without the lock


def attach(event: str, handler: Handler) -> None:
    """Call ``handler(event, measurements, metadata)`` for each ``event`` (``"*"``: all)."""
    if event != "*" and event not in EVENTS:
        raise ValueError(f"unknown telemetry event {event!r}; known: {', '.join(EVENTS)}")
    with _lock:
        _handlers[event] = (*_handlers.get(event, ()), handler)


def detach(event: str, handler: Handler) -> bool:
    """Remove a handler; False if it was not attached."""
    with _lock:
        handlers = _handlers.get(event, ())
        if handler not in handlers:
            return False
        remaining = list(handlers)
        remaining.remove(handler)
        _handlers[event] = tuple(remaining)
        return True


def emit(
    event: str,
    measurements: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Send an event to its handlers and to the log. Never raises."""
    measurements = dict(measurements or {})
    metadata = dict(metadata or {})
    # The caller gets a failed stream's exception, so its event is news, not an error.
    level = logging.WARNING if event in ("memory.warning", "memory.critical") else logging.DEBUG
    if event in ("pipeline.failed", "process.restarted", "batch.quarantined"):
        level = logging.INFO
    if logger.isEnabledFor(level):
        logger.log(
            level,
            "%s %s %s",
            event,
            measurements,
            metadata,
            extra={"event": event, "measurements": measurements, "metadata": metadata},
        )
    for handler in _handlers.get(event, ()) + _handlers.get("*", ()):
        try:
            handler(event, measurements, metadata)
        except Exception:
            logger.exception("telemetry handler %r failed on %s; ignored", handler, event)


@contextmanager
def stream_events(metadata: Mapping[str, Any], rows: Callable[[], int]) -> Iterator[dict]:
    """``pipeline.started`` now, ``pipeline.failed`` if an ashstream error leaves the
    block, ``pipeline.stopped`` at its end, with the status the block set in the dict
    it gets (``completed``), else ``cancelled`` (the caller stopped) or ``failed``. For
    engines that run a stream in the caller's thread; the local pool's supervisor emits
    the same events from its own bookkeeping."""
    from ashstream.errors import AshstreamError

    started = time.monotonic()
    emit("pipeline.started", {}, metadata)
    outcome = {"status": "failed"}
    try:
        yield outcome
    except GeneratorExit:
        outcome["status"] = "cancelled"
        raise
    except AshstreamError as exc:
        error = {"error": str(exc), "error_type": type(exc).__name__}
        emit("pipeline.failed", {"rows": rows()}, {**metadata, **error})
        raise
    finally:
        emit(
            "pipeline.stopped",
            {"rows": rows(), "duration_s": time.monotonic() - started},
            {**metadata, "status": outcome["status"]},
        )
