"""The Ray engine: a report's batches read and encoded by tasks on a Ray cluster.

What runs where:

- **Cluster**: :func:`ashstream.batch_job.encode_batch`, the very function the local
  transformers run, once per batch, on any node. For a Parquet source whose rows need
  no ordered stage (see below), reading too: the files are cut into parts of whole row
  groups, and a task reads each part with the driver's own code
  (:func:`ashstream.batch_job.read_batches`: DuckDB, so ``where``, ``fields`` and
  ``expr`` mean what they mean locally) and another encodes it where it lies.
- **Driver** (this process): opens the source first in every case, so that a wrong
  field, a missing file or a schema that differs between files fails before any task.
  Reads the rows itself when they need an ordered stage. Takes the results back in
  source order, merges them with the same :class:`~ashstream.chunks.OrderedMerge` and
  writes them with the same sinks.

The ordered stage: running values (``running: true``) need every row in order, and
float running sums accumulate in float64 in row order, so per-batch prefixes resolved
afterwards would change last digits; ``order_by`` and group sorts (without ``sorted:
true``) are DuckDB's own (nulls last, NaN above numbers, ``desc``), spilling to disk
when large, and a distributed sort would have to copy those rules exactly. For such
reports the driver reads (as the local producer does) and every batch goes to the
object store with its encode task: byte-identical, at the cost of the driver's read
rate (see README.rst, "Scale model").

Backpressure: at most ``TASKS_PER_CPU`` tasks per cluster CPU are in flight (encodes;
on the cluster path as many part reads besides), and, of batches the driver put,
``max_bytes_in_flight`` Arrow bytes; the driver waits for the oldest before reading
on, so its memory stays flat however large the source.

Faults: Ray retries a task whose worker process or node died (``MAX_TASK_RETRIES``).
Its input is the driver's (whose node holds the primary copy) or a read task's output,
which Ray rebuilds from lineage if its node is gone; a retry encodes the same rows into
the same bytes. Past the retries the stream fails with
:class:`~ashstream.errors.WorkerCrashed`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from ashstream import telemetry
from ashstream.batch_job import (
    DEFAULT_SLOT_BYTES,
    MIN_BATCH_ROWS,
    EncodedBatch,
    batch_failure,
    batch_rows,
    encode_batch,
    input_bytes,
    read_batches,
)
from ashstream.chunks import Chunk, MergedStream, check_memory_limit
from ashstream.encode import EncodeOptions
from ashstream.engines import Pool
from ashstream.engines.inline import unshared_rss
from ashstream.errors import (
    INTERNAL_ERROR_ADVICE,
    AshstreamError,
    Cancelled,
    PipelineError,
    SourceError,
    WorkerCrashed,
)
from ashstream.report import Report, with_params
from ashstream.sources import has_order_by, parquet_parts, sweep_stale_spill_dirs
from ashstream.status_files import (
    REWRITE_INTERVAL_S,
    new_status_file,
    remove_status_file,
    rewrite_status_file,
)

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
# A Parquet part read by one task holds whole row groups, at least this many batches'
# worth of rows (min_batch_rows each).
PART_BATCHES = 4
# How often a wait for a result returns to Python, so that Ctrl-C and SIGTERM are seen.
POLL_S = 0.2


def _encode(
    batch: Any,
    first_row: int,
    chunk_size: int,
    options: EncodeOptions,
    analysis: Any,
    seq: int | str,
) -> EncodedBatch | AshstreamError:
    """The task: the batch job, with a failure returned as the error the user reads
    (an exception raised here would make Ray wrap it in its own)."""
    try:
        return encode_batch(batch, first_row, chunk_size, options, analysis)
    except Exception as exc:
        if not isinstance(exc, AshstreamError):
            logger.debug("batch %s failed", seq, exc_info=True)
        return batch_failure(exc, first_row, batch.num_rows, seq)


def _read_part(
    part: Report, schema: Any, chunk_size: int, min_batch_rows: int, max_batch_bytes: int
) -> tuple[int | AshstreamError, list[Any] | None]:
    """The task that reads a part on the cluster, by the driver's own code: its row
    count and batches, or the error (naming the part and the node: the node's files may
    differ from the driver's)."""
    where = f"{_part_words(part)}, read on the Ray node {ray.util.get_node_ip_address()}"
    try:
        source = read_batches(part, chunk_size, min_batch_rows, max_batch_bytes)
        try:
            batches = list(source.batches)
        finally:
            source.close()
    except AshstreamError as exc:
        return type(exc)(f"{exc} ({where})"), None
    except Exception as exc:
        logger.debug("reading %s failed", where, exc_info=True)
        return PipelineError(f"{where}: {type(exc).__name__}: {exc}. {INTERNAL_ERROR_ADVICE}"), None
    if batches and batches[0].schema != schema:
        return SourceError(
            f"{where}: the part's columns are {batches[0].schema}, but the whole source's "
            f"are {schema} (a hive-partitioned path whose values differ in type?); read "
            "it with a DuckDB query source instead"
        ), None
    return sum(b.num_rows for b in batches), batches


def _encode_part(
    batches: list[Any],
    first_row: int,
    chunk_size: int,
    options: EncodeOptions,
    analysis: Any,
    part: str,
) -> list[EncodedBatch] | AshstreamError:
    """The task that encodes a part's batches, where they were read."""
    done = []
    for i, batch in enumerate(batches):
        result = _encode(batch, first_row, chunk_size, options, analysis, f"{i} of {part}")
        if isinstance(result, AshstreamError):
            return result
        done.append(result)
        first_row += batch.num_rows
    return done


# Retried when a worker or node dies, never when the function raised (it returns errors).
_TASK_OPTIONS = {"num_cpus": 1, "max_retries": MAX_TASK_RETRIES, "retry_exceptions": False}
_encode_task = ray.remote(**_TASK_OPTIONS)(_encode)
_encode_part_task = ray.remote(**_TASK_OPTIONS)(_encode_part)
_read_part_task = ray.remote(**_TASK_OPTIONS, num_returns=2)(_read_part)


def reads_on_cluster(report: Report) -> bool:
    """Whether the report's source is read by tasks on the cluster: Parquet files whose
    rows need no ordered stage. A sort (groups or order_by, unless ``sorted: true``)
    and running values are that stage, and run on the driver (module docstring); so
    does SQL that sees more than one row (a window, OVER, or a subquery, SELECT), which
    would see only its part."""
    running = any(v.running for v in report.variables)
    sql = [report.source.where or ""] + [x.expr or "" for x in (*report.fields, *report.groups)]
    whole_source = re.search(r"\b(over|select)\b", " ".join(sql), re.IGNORECASE)
    return (
        bool(report.source.parquet)
        and not has_order_by(report)
        and not running
        and not whole_source
    )


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
    where: str  # what it works on, as the user's messages name it
    ref: Any  # ray.ObjectRef of its result: EncodedBatch(es), a row count, or the error
    nbytes: int = 0  # Arrow bytes the driver put in the store for it
    batches: Any = None  # of a part's read: the ObjectRef of its batches


class RayStream(MergedStream):
    """One report's chunks in source order, encoded on the cluster: iterate it once,
    then read ``columns``, ``total_rows`` and ``summary``. Closing the iterator early,
    or :meth:`cancel`, stops it: its tasks in flight are dropped, and their objects
    freed."""

    def __init__(self, pool: RayPool, report: Report, chunk_size: int | None = None) -> None:
        super().__init__(report, chunk_size, pool.min_batch_rows)
        self.id = f"ray-{os.getpid()}-{next(_stream_numbers)}"
        self.started_at = time.time()
        self._pool = pool
        pool.streams.add(self)
        self.schema: Any = None  # the source's Arrow schema, once open
        # "cluster": tasks read the Parquet parts; "driver": this process reads
        self.read_on = "cluster" if reads_on_cluster(report) else "driver"

    def _chunks(self) -> Iterator[Chunk]:
        status = "cancelled"  # unless it ends otherwise
        try:
            yield from self._run()
            status = "completed"
        except SystemError as exc:
            # A signal handler that raised (Ctrl-C, the CLI's SIGTERM) inside Ray's C
            # code surfaces as a SystemError caused by its exception: raise that one.
            if isinstance(exc.__cause__, KeyboardInterrupt | Cancelled):
                raise exc.__cause__ from None
            status = "failed"
            raise
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException:
            status = "failed"
            raise
        finally:
            self._pool.record(self, status)

    def _run(self) -> Iterator[Chunk]:
        pool, merge = self._pool, self._merge
        metadata = {"stream_id": self.id, "report": self.report.name, "engine": "ray"}
        pool.record(self, "running")
        with telemetry.stream_events(metadata, lambda: merge.rows) as outcome:
            sweep_stale_spill_dirs()
            # Opened here in any case: the report's fields, types and files are checked
            # (schema drift included) before any task starts, and columns are known.
            source = read_batches(
                self.report, self.chunk_size, pool.min_batch_rows, pool.max_batch_bytes
            )
            try:
                self.columns, self.total_rows = source.columns, source.total_rows
                self.schema = source.schema
                options = EncodeOptions(timezone=self.report.pipeline.timezone)
                if self.read_on == "cluster":
                    source.close()
                    results = self._read_on_cluster(options)
                else:
                    results = self._read_on_driver(source.batches, options)
                try:
                    for done in results:
                        yield from merge.take(done)
                        pool.record(self, "running", every_s=REWRITE_INTERVAL_S)
                        check_memory_limit(self.report, unshared_rss(), "the Ray driver")
                    merge.finish()
                    outcome["status"] = "completed"
                finally:
                    results.close()  # its tasks in flight are dropped
            finally:
                source.close()  # the DuckDB connection and its spill folder

    def _read_on_driver(
        self, batches: Iterator[Any], options: EncodeOptions
    ) -> Iterator[EncodedBatch]:
        """Each batch the driver reads, encoded by a task; results in order."""
        pool = self._pool
        max_tasks = pool.max_tasks_in_flight()
        in_flight: deque[_Task] = deque()
        try:
            submitted = 0
            for seq, batch in enumerate(batches):
                ref = _encode_task.remote(
                    batch, submitted, self.chunk_size, options, self._analysis, seq
                )
                where = batch_rows(submitted, batch.num_rows, seq)
                in_flight.append(_Task(where, ref, batch.nbytes))
                submitted += batch.num_rows
                del batch  # the object store holds it now
                while len(in_flight) >= max_tasks or (
                    len(in_flight) > 1
                    and sum(t.nbytes for t in in_flight) > pool.max_bytes_in_flight
                ):
                    yield self._take(in_flight, EncodedBatch)
            while in_flight:
                yield self._take(in_flight, EncodedBatch)
        finally:
            _drop(in_flight)

    def _read_on_cluster(self, options: EncodeOptions) -> Iterator[EncodedBatch]:
        """Each part of the Parquet files read by a task on the cluster, then encoded by
        another where its batches are (Ray schedules by locality). A part's first row
        is known once the parts before it are read (a ``where`` drops rows), and the
        analysis needs it: reads run ahead on their own, and each becomes an encode
        task, in order, once it is done."""
        pool = self._pool
        max_tasks = pool.max_tasks_in_flight()
        parts = parquet_parts(self.report, PART_BATCHES * pool.min_batch_rows)
        reads: deque[_Task] = deque()  # ref: the part's row count; batches: its batches
        encodes: deque[_Task] = deque()
        next_part = first_row = 0
        try:
            while next_part < len(parts) or reads or encodes:
                while next_part < len(parts) and len(reads) < max_tasks:
                    part = parts[next_part]
                    count, batches = _read_part_task.remote(
                        part,
                        self.schema,
                        self.chunk_size,
                        pool.min_batch_rows,
                        pool.max_batch_bytes,
                    )
                    reads.append(_Task(_part_words(part), count, batches=batches))
                    next_part += 1
                # A read becomes an encode when done; the driver waits for one only when
                # no encode is left to wait for.
                while reads and len(encodes) < max_tasks and (not encodes or _done(reads[0])):
                    rows = self._result(reads[0], int)
                    read = reads.popleft()
                    if rows:
                        ref = _encode_part_task.remote(
                            read.batches,
                            first_row,
                            self.chunk_size,
                            options,
                            self._analysis,
                            read.where,
                        )
                        where = f"rows {first_row}..{first_row + rows - 1} ({read.where})"
                        encodes.append(_Task(where, ref))
                        first_row += rows
                if encodes:
                    done = self._result(encodes[0], list)
                    encodes.popleft()
                    yield from done
        finally:
            _drop(reads)
            _drop(encodes)

    def _take(self, in_flight: deque[_Task], expected: type) -> Any:
        """The oldest task's result; the task stays in ``in_flight`` (to be dropped)
        until its result is here."""
        result = self._result(in_flight[0], expected)
        in_flight.popleft()
        return result

    def _result(self, task: _Task, expected: type) -> Any:
        """The task's result, waiting for it in short steps so that a signal's handler
        runs meanwhile; errors become the one the user reads."""
        where = task.where
        try:
            while not ray.wait([task.ref], timeout=POLL_S, fetch_local=True)[0]:
                pass
            result = ray.get(task.ref)
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
        ) as exc:
            raise WorkerCrashed(
                f"{where}: the Ray worker working on it died {MAX_TASK_RETRIES + 1} times "
                f"({_first_line(exc)}); see the Ray logs of the cluster"
            ) from None
        except ray.exceptions.RayTaskError as exc:  # the task could not even start
            raise PipelineError(
                f"{where}: a Ray task failed: {type(exc.cause).__name__}: {exc.cause}; is "
                "ashstream (with the same version) installed on every node?"
            ) from None
        except ray.exceptions.RayError as exc:
            raise PipelineError(
                f"{where}: the Ray cluster failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        if isinstance(result, AshstreamError):
            raise result
        if not isinstance(result, expected):
            raise PipelineError(
                f"{where}: a task returned {type(result).__name__}. {INTERNAL_ERROR_ADVICE}"
            )
        return result


def _drop(in_flight: deque[_Task]) -> None:
    """Drop the tasks still in flight: with their last reference their results are
    freed as soon as they finish (at most TASKS_PER_CPU per CPU, a batch or a part
    each). They are not ray.cancel-led: in Ray 2.60 a cancel racing the task's end
    aborted the driver (a failed CHECK in its task manager) in 1 of 10 Ctrl-Cs here."""
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


def _done(task: _Task) -> bool:
    return bool(ray.wait([task.ref], timeout=0, fetch_local=False)[0])


def _part_words(part: Report) -> str:
    first, last = part.source.row_range or (0, 0)
    return f"{part.source.parquet[0]} rows {first}..{last - 1}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayPool(Pool):
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
        self.max_batch_bytes = input_bytes(DEFAULT_SLOT_BYTES)  # as the local engine's
        self.peak_memory_bytes = 0  # the driver's resident memory, less shared pages
        self.restarts = None  # Ray retries tasks itself and does not say how often
        self.workers = 0  # CPUs of the cluster when the pool opened: one task each
        self._owns_ray = False  # ray.init was ours: close shuts it down
        self.streams: weakref.WeakSet[RayStream] = weakref.WeakSet()  # started here
        self._open = False
        self._opened_at = 0.0
        self._status_file: str | None = None  # its name, for ashstream status
        self._streams: dict[str, dict[str, Any]] = {}
        self._recorded_at = 0.0

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
            self._owns_ray = True
        self._open = True  # from here on, close() undoes what open() did
        try:
            # Asked once: each ask is a round trip to the cluster's control service.
            self.workers = int(ray.cluster_resources().get("CPU", 0))
            if self.workers < 1:
                raise PipelineError(
                    f"the Ray cluster at {self.address or 'this machine'} has no CPU for "
                    "tasks (started with --num-cpus=0?); add a node with CPUs"
                )
        except BaseException:
            self.close()
            raise
        self._opened_at = time.time()
        try:
            self._status_file = new_status_file(self._status_info())
        except OSError as exc:
            logger.warning("`ashstream status` cannot list this pool's streams: %s", exc)

    def close(self) -> None:
        """Shut down the Ray this pool started (or leave, if it only joined one)."""
        if not self._open:
            return
        self._open = False
        try:
            # A stream the caller left unfinished (an exception in its loop) stops
            # now, while Ray is still there.
            for stream in list(self.streams):
                stream.cancel()
            if self._status_file is not None:
                try:
                    remove_status_file(self._status_file)
                except OSError as exc:  # the directory was swapped meanwhile
                    logger.debug("cannot remove the status file %s: %s", self._status_file, exc)
                self._status_file = None
        finally:
            if self._owns_ray:
                self._owns_ray = False
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


__all__ = ["RayPool", "RayStream"]
