"""The Ray engine: a report's batches encoded by tasks on a Ray cluster.

What runs where:

- **Driver** (this process): the source is read by the code the local producer runs
  (:func:`ashstream.batch_job.read_batches`: DuckDB, running values, batches cut by
  bytes); each batch goes into the object store with a task to encode it. Results are
  taken back in the order the tasks were submitted, merged by the same
  :class:`~ashstream.chunks.OrderedMerge` and written by the same sinks.
- **Cluster**: :func:`ashstream.batch_job.encode_batch`, the very function the local
  transformers run, once per batch, on any node.

Why the driver reads: running values (``running: true``) need every row in order, and
float running sums accumulate in float64 in row order, so per-batch prefixes resolved
afterwards would change last digits: an ordered stage is the only byte-identical
design, and the reader is that stage. ``order_by`` and group sorts are DuckDB's own
(nulls last, NaN above numbers, ``desc``), spilling to disk when large; a second,
distributed sort would have to copy those rules exactly. Reading costs the driver a
small part of the work (Arrow batches straight from DuckDB); encoding is the large
part, and it is what the cluster does.

Backpressure: at most ``TASKS_PER_CPU`` tasks per cluster CPU and
``max_bytes_in_flight`` Arrow bytes are in flight; the driver waits for the oldest
before reading on, so its memory stays flat however large the source.

Faults: Ray retries a task whose worker process or node died (``MAX_TASK_RETRIES``).
Its input was put by the driver, whose node holds the primary copy, so a retry encodes
the same batch into the same bytes; a result lost with its node is rebuilt from lineage.
Past the retries the stream fails with :class:`~ashstream.errors.WorkerCrashed`.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.exceptions

from ashstream import telemetry
from ashstream.analysis.aggregate import Analysis, Summary
from ashstream.batch_job import (
    MIN_BATCH_ROWS,
    EncodedBatch,
    batch_failure,
    batch_rows,
    encode_batch,
    read_batches,
)
from ashstream.chunks import Chunk, OrderedMerge
from ashstream.encode import EncodeOptions, EncodeStats
from ashstream.engines.inline import checked_chunk_size, unshared_rss
from ashstream.errors import (
    INTERNAL_ERROR_ADVICE,
    AshstreamError,
    Cancelled,
    PipelineError,
    WorkerCrashed,
)
from ashstream.report import Report, with_params
from ashstream.sources import sweep_stale_spill_dirs
from ashstream.status_files import REWRITE_INTERVAL_S, new_status_file, rewrite_status_file

logger = logging.getLogger(__name__)

# Ray retries a task this many times when its worker or node dies (not when it raises).
MAX_TASK_RETRIES = 3
# Tasks in flight per CPU of the cluster: one running, one queued behind it, so that no
# CPU waits for the driver between two batches.
TASKS_PER_CPU = 2
# Arrow bytes of the batches in flight at most, whatever the cluster's size.
MAX_BYTES_IN_FLIGHT = 256 * 2**20
# How long reaching a cluster's address may take before the run fails: ray.init itself
# retries an unreachable address for minutes.
CONNECT_TIMEOUT_S = 5.0
# How often a wait for a result returns to Python, so that Ctrl-C and SIGTERM are seen.
POLL_S = 0.2


def _encode(
    batch: Any, first_row: int, chunk_size: int, options: EncodeOptions, analysis: Any, seq: int
) -> EncodedBatch | AshstreamError:
    """The task: the batch job, with a failure returned as the error the user reads
    (an exception raised here would make Ray wrap it in its own)."""
    try:
        return encode_batch(batch, first_row, chunk_size, options, analysis)
    except Exception as exc:
        if not isinstance(exc, AshstreamError):
            logger.debug("batch %d failed", seq, exc_info=True)
        return batch_failure(exc, first_row, batch.num_rows, seq)


_encode_task = ray.remote(num_cpus=1, max_retries=MAX_TASK_RETRIES, retry_exceptions=False)(_encode)


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


_stream_numbers = itertools.count(1)


@dataclass
class _Task:
    seq: int
    first_row: int
    rows: int
    nbytes: int
    ref: Any  # ray.ObjectRef of the EncodedBatch (or the error)


class RayStream:
    """One report's chunks in source order, encoded on the cluster: iterate it once,
    then read ``columns``, ``total_rows`` and ``summary``. Closing the iterator early
    cancels the stream's tasks and frees its objects."""

    def __init__(
        self,
        pool: RayPool,
        report: Report,
        chunk_size: int | None = None,
    ) -> None:
        self.report = report
        self.chunk_size = checked_chunk_size(report, chunk_size, pool.min_batch_rows)
        self.columns: tuple[str, ...] | None = None
        self.total_rows: int | None = None
        self.skipped: list[tuple[int, int]] = []  # a failed batch fails the stream
        self.id = f"ray-{os.getpid()}-{next(_stream_numbers)}"
        self.started_at = time.time()
        self._pool = pool
        self._analysis = Analysis.of(report)
        self._merge = OrderedMerge(self._analysis, self.chunk_size)
        self._iterator: Iterator[Chunk] | None = None

    @property
    def lossy(self) -> EncodeStats:
        return self._merge.lossy

    @property
    def summary(self) -> Summary:
        return self._merge.summary

    def __iter__(self) -> Iterator[Chunk]:
        if self._iterator is not None:
            raise PipelineError("a RayStream is read once; start the report again to reread it")
        self._iterator = self._chunks()
        return self._iterator

    def cancel(self) -> None:
        """Stop the stream: its tasks are cancelled and its objects freed."""
        if self._iterator is not None:
            self._iterator.close()

    def _chunks(self) -> Iterator[Chunk]:
        status = "cancelled"  # unless it ends otherwise
        try:
            yield from self._run()
            status = "completed"
        except AshstreamError:
            status = "failed"
            raise
        finally:
            self._pool.record(self, status)

    def _run(self) -> Iterator[Chunk]:
        pool, merge = self._pool, self._merge
        metadata = {"stream_id": self.id, "report": self.report.name, "engine": "ray"}
        in_flight: deque[_Task] = deque()
        pool.record(self, "running")
        with telemetry.stream_events(metadata, lambda: merge.rows) as outcome:
            sweep_stale_spill_dirs()
            source = read_batches(self.report, self.chunk_size, pool.min_batch_rows)
            try:
                self.columns, self.total_rows = source.columns, source.total_rows
                options = EncodeOptions(timezone=self.report.pipeline.timezone)
                max_tasks = pool.max_tasks_in_flight()
                submitted = 0
                for seq, batch in enumerate(source.batches):
                    ref = _encode_task.remote(
                        batch, submitted, self.chunk_size, options, self._analysis, seq
                    )
                    in_flight.append(_Task(seq, submitted, batch.num_rows, batch.nbytes, ref))
                    submitted += batch.num_rows
                    del batch  # the object store holds it now
                    while len(in_flight) >= max_tasks or (
                        len(in_flight) > 1
                        and sum(t.nbytes for t in in_flight) > pool.max_bytes_in_flight
                    ):
                        yield from merge.take(self._result(in_flight.popleft()))
                        pool.record(self, "running", every_s=REWRITE_INTERVAL_S)
                while in_flight:
                    yield from merge.take(self._result(in_flight.popleft()))
                    pool.record(self, "running", every_s=REWRITE_INTERVAL_S)
                merge.finish()
                outcome["status"] = "completed"
            finally:
                _cancel(in_flight)
                source.batches.close()  # the DuckDB connection and its spill folder

    def _result(self, task: _Task) -> EncodedBatch:
        """The task's result, waiting for it in short steps so that a signal's handler
        runs meanwhile; errors become the one the user reads."""
        where = batch_rows(task.first_row, task.rows, task.seq)
        try:
            while not ray.wait([task.ref], timeout=POLL_S, fetch_local=True)[0]:
                pass
            result = ray.get(task.ref)
        except SystemError as exc:
            # A signal handler that raised (Ctrl-C, the CLI's SIGTERM) inside Ray's
            # C code surfaces as a SystemError caused by its exception: raise that one.
            if isinstance(exc.__cause__, KeyboardInterrupt | Cancelled):
                raise exc.__cause__ from None
            raise
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
        ) as exc:
            raise WorkerCrashed(
                f"{where}: the Ray worker encoding it died {MAX_TASK_RETRIES + 1} times "
                f"({_first_line(exc)}); see the Ray logs of the cluster"
            ) from None
        except ray.exceptions.RayError as exc:
            raise PipelineError(
                f"{where}: the Ray cluster failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        if isinstance(result, AshstreamError):
            raise result
        if not isinstance(result, EncodedBatch):
            raise PipelineError(
                f"{where}: a task returned {type(result).__name__}. {INTERNAL_ERROR_ADVICE}"
            )
        return result


def _cancel(in_flight: deque[_Task]) -> None:
    """Cancel the tasks still in flight; their objects go with the last reference."""
    for task in in_flight:
        try:
            ray.cancel(task.ref)
        except Exception:  # already finished, or the cluster is gone: nothing to stop
            logger.debug("cancelling batch %d", task.seq, exc_info=True)
    in_flight.clear()


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayPool:
    """Runs reports on a Ray cluster: the same ``start``/``stream`` as
    :class:`ashstream.StreamPool`, the same chunks and bytes::

        with RayPool("auto") as pool:
            for chunk in pool.stream("report.yaml"):
                sink.write(chunk.text)

    Args:
        address: the cluster (``auto``, ``host:port``, ``ray://host:port``); default
            ``RAY_ADDRESS``, else a local Ray is started when the pool opens and shut
            down when it closes. A Ray this process has already joined is used as it is.
        min_batch_rows: rows read and encoded together at least.
        max_bytes_in_flight: Arrow bytes of the batches in flight at most.
    """

    engine = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        min_batch_rows: int = MIN_BATCH_ROWS,
        max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT,
    ) -> None:
        if min_batch_rows < 1:
            raise ValueError(f"min_batch_rows must be at least 1, got {min_batch_rows}")
        self.address = cluster_address(address)
        self.min_batch_rows = min_batch_rows
        self.max_bytes_in_flight = max_bytes_in_flight
        self.peak_memory_bytes = 0  # the driver's resident memory, less shared pages
        self.restarts = 0  # Ray retries tasks itself and does not say how often
        self.workers = 0  # CPUs of the cluster when the pool opened: one task each
        self._joined = False  # ray.init was ours: close shuts it down
        self._open = False
        self._opened_at = 0.0
        self._status_file: Path | None = None  # for ashstream status
        self._streams: dict[str, dict[str, Any]] = {}
        self._recorded_at = 0.0

    def __enter__(self) -> RayPool:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        if self._open:
            return
        if not ray.is_initialized():
            if self.address is not None:
                check_reachable(self.address)
            with _signal_handlers_kept():
                try:
                    ray.init(
                        # "local": a new Ray even when another runs on this machine
                        # (without an address, ray.init would join the newest one).
                        address=self.address or "local",
                        include_dashboard=False if self.address is None else None,
                        log_to_driver=False,
                        logging_level=logging.ERROR,
                    )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    where = self.address or "a local Ray"
                    raise PipelineError(
                        f"cannot start or join {where}: {_first_line(exc)}"
                    ) from None
            self._joined = True
        # Asked once: each ask is a round trip to the cluster's control service.
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._open = True
        self._opened_at = time.time()
        try:
            self._status_file = new_status_file(self._status_info())
        except OSError as exc:
            logger.debug("no status file: %s", exc)

    def close(self) -> None:
        """Shut down the Ray this pool started (or left, if it only joined one)."""
        if self._open:
            self._open = False
            if self._status_file is not None:
                self._status_file.unlink(missing_ok=True)
                self._status_file = None
            if self._joined:
                self._joined = False
                ray.shutdown()

    def max_tasks_in_flight(self) -> int:
        return TASKS_PER_CPU * max(1, self.workers)

    def record(self, stream: RayStream, status: str, every_s: float = 0.0) -> None:
        """Note the driver's memory and the stream's progress; rewrite the status file
        for ``ashstream status`` (at most every ``every_s`` seconds)."""
        self.peak_memory_bytes = max(self.peak_memory_bytes, unshared_rss())
        now = time.monotonic()
        if now - self._recorded_at < every_s or self._status_file is None:
            return
        self._recorded_at = now
        rows = stream._merge.rows
        elapsed = time.time() - stream.started_at
        self._streams[stream.id] = {
            "id": stream.id,
            "report": stream.report.name,
            "status": status,
            "rows": rows,
            "total_rows": stream.total_rows,
            "rows_per_s": rows / elapsed if elapsed > 0 else 0.0,
            "memory_bytes": self.peak_memory_bytes,
            "started_at": stream.started_at,
        }
        try:
            rewrite_status_file(self._status_file, self._status_info())
        except OSError as exc:  # status is best-effort; the stream runs on
            logger.debug("cannot rewrite %s: %s", self._status_file, exc)

    def _status_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self._opened_at,
            "engine": "ray",
            "address": self.address or "local",
            "streams": list(self._streams.values()),
        }

    def start(
        self,
        report: Report | str | os.PathLike,
        chunk_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> RayStream:
        """Start streaming ``report`` (a :class:`Report` or the path of its YAML file)."""
        self.open()
        return RayStream(self, with_params(report, params), chunk_size)

    def stream(
        self,
        report: Report | str | os.PathLike,
        chunk_size: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[Chunk]:
        """The chunks of ``report`` in source order; see :meth:`start`."""
        return iter(self.start(report, chunk_size, params))


__all__ = ["RayPool", "RayStream"]
