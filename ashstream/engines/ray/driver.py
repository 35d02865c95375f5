"""The driver's scheduler: one report's batches sent to the cluster as tasks, and their
results taken back in source order, in the process that started the run.

The driver opens the source first in every case, so that a wrong field, a missing file
or a schema that differs between files fails before any task. Then either the cluster
reads (:meth:`RayStream._read_on_cluster`: a Parquet source whose rows need no ordered
stage is cut into parts of whole row groups, a task reads each part with the driver's
own code and another encodes it where it lies), or the driver reads and each batch goes
to the object store with its encode task (:meth:`RayStream._read_on_driver`). Either
way the results are merged with the same :class:`~ashstream.chunks.OrderedMerge` as on
the other engines.

The ordered stage: running values (``running: true``) need every row in order, and
float running sums accumulate in float64 in row order, so per-batch prefixes resolved
afterwards would change last digits; ``order_by`` and group sorts (without ``sorted:
true``) are DuckDB's own (nulls last, NaN above numbers, ``desc``), spilling to disk
when large, and a distributed sort would have to copy those rules exactly. For such
reports the driver reads, as the local producer does: byte-identical, at the cost of
the driver's read rate (README.rst, "Scale model").

Backpressure: at most ``TASKS_PER_CPU`` tasks per cluster CPU are in flight (encodes;
on the cluster path as many part reads besides), and, of batches the driver put,
``max_bytes_in_flight`` Arrow bytes; the driver waits for the oldest before reading
on, so its memory stays flat however large the source.

Faults: Ray retries a task whose worker process or node died
(:data:`~ashstream.engines.ray.tasks.MAX_TASK_RETRIES`). Its input is the driver's
(whose node holds the primary copy) or a read task's output, which Ray rebuilds from
lineage if its node is gone; a retry encodes the same rows into the same bytes. Past
the retries the stream fails with :class:`~ashstream.errors.WorkerCrashed`.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from ashstream import telemetry
from ashstream.batch_job import EncodedBatch, batch_rows, read_batches
from ashstream.chunks import Chunk, MergedStream, check_memory_limit, unshared_memory_bytes
from ashstream.encode import EncodeOptions
from ashstream.engines.ray.cluster import first_line
from ashstream.engines.ray.tasks import (
    MAX_TASK_RETRIES,
    encode_part_task,
    encode_task,
    part_words,
    read_part_task,
)
from ashstream.errors import (
    INTERNAL_ERROR_ADVICE,
    AshstreamError,
    Cancelled,
    PipelineError,
    WorkerCrashed,
)
from ashstream.report import Report
from ashstream.sources import has_order_by, parquet_parts, sweep_stale_spill_dirs
from ashstream.status_files import REWRITE_INTERVAL_S

if TYPE_CHECKING:
    from ashstream.engines.ray.pool import RayPool

# Tasks in flight per CPU of the cluster: one running, one queued behind it, so that no
# CPU waits for the driver between two batches.
TASKS_PER_CPU = 2
# A Parquet part read by one task holds whole row groups, at least this many batches'
# worth of rows (min_batch_rows each).
PART_BATCHES = 4
# How often a wait for a result returns to Python, so that Ctrl-C and SIGTERM are seen.
POLL_S = 0.2


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
        status, error = "cancelled", None  # unless it ends otherwise
        try:
            yield from self._run()
            status = "completed"
        except SystemError as exc:
            # A signal handler that raised (Ctrl-C, the CLI's SIGTERM) inside Ray's C
            # code surfaces as a SystemError caused by its exception: raise that one.
            if isinstance(exc.__cause__, KeyboardInterrupt | Cancelled):
                raise exc.__cause__ from None
            status, error = "failed", str(exc)
            raise
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            status, error = "failed", str(exc)
            raise
        finally:
            self._pool.record(self, status, error=error)

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
                        check_memory_limit(self.report, unshared_memory_bytes(), "the Ray driver")
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
                ref = encode_task.remote(
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
                    count, batches = read_part_task.remote(
                        part,
                        self.schema,
                        self.chunk_size,
                        pool.min_batch_rows,
                        pool.max_batch_bytes,
                    )
                    reads.append(_Task(part_words(part), count, batches=batches))
                    next_part += 1
                # A read becomes an encode when done; the driver waits for one only when
                # no encode is left to wait for.
                while reads and len(encodes) < max_tasks and (not encodes or _done(reads[0])):
                    rows = self._result(reads[0], int)
                    read = reads.popleft()
                    if rows:
                        ref = encode_part_task.remote(
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
                f"({first_line(exc)}); see the Ray logs of the cluster"
            ) from None
        except ray.exceptions.RayTaskError as exc:  # the task could not even start
            raise PipelineError(
                f"{where}: a Ray task failed: {type(exc.cause).__name__}: {exc.cause}; is "
                "ashstream (with the same version) installed on every node?"
            ) from None
        except ray.exceptions.RayError as exc:
            raise PipelineError(
                f"{where}: the Ray cluster failed: {type(exc).__name__}: {first_line(exc)}"
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
    each). They are not ray.cancel-led: in Ray 2.60 a cancel racing the task's end can
    abort the driver (a failed CHECK in its task manager)."""
    in_flight.clear()


def _done(task: _Task) -> bool:
    """Whether the task's result is ready, without waiting. Never blocks."""
    return bool(ray.wait([task.ref], timeout=0, fetch_local=False)[0])
