"""The Ray pool: opens the cluster for a run (joined, or a local Ray started and shut
down with the pool), starts its streams and publishes them for ``ashstream status``."""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping
from typing import Any

import ray

from ashstream.batch_job import DEFAULT_SLOT_BYTES, MIN_BATCH_ROWS, input_bytes
from ashstream.chunks import unshared_memory_bytes
from ashstream.engines import Pool
from ashstream.engines.ray.cluster import cluster_address, connect
from ashstream.engines.ray.driver import TASKS_PER_CPU, RayStream
from ashstream.errors import PipelineError
from ashstream.report import Report, with_params
from ashstream.status_files import new_status_file, remove_status_file, rewrite_status_file
from ashstream.stream_record import FINISHED, StreamRecord

logger = logging.getLogger(__name__)

# Arrow bytes of the batches in flight at most, whatever the cluster's size.
MAX_BYTES_IN_FLIGHT = 256 * 2**20


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
        """Join the cluster (or start a local Ray) and count its CPUs; again is a no-op.

        Raises:
            PipelineError: in one line, when Ray cannot be reached, joined or started,
                or has no CPU for tasks.
        """
        if self._open:
            return
        if not ray.is_initialized():
            connect(self.address)
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
        """Encode tasks a stream keeps in flight: ``TASKS_PER_CPU`` per cluster CPU."""
        return TASKS_PER_CPU * max(1, self.workers)

    def record(
        self, stream: RayStream, status: str, every_s: float = 0.0, error: str | None = None
    ) -> None:
        """Note the driver's memory and the stream's progress; rewrite the status file
        for ``ashstream status`` (at most every ``every_s`` seconds)."""
        memory = unshared_memory_bytes()
        self.peak_memory_bytes = max(self.peak_memory_bytes, memory)
        now = time.monotonic()
        if now - self._recorded_at < every_s or self._status_file is None:
            return
        self._recorded_at = now
        merge = stream._merge
        self._streams[stream.id] = StreamRecord(
            id=stream.id,
            report=stream.report.name,
            status=status,
            rows=merge.rows,
            total_rows=stream.total_rows,
            chunks=merge.chunks,
            bytes=merge.bytes,
            started_at=stream.started_at,
            finished_at=time.time() if status in FINISHED else None,
            memory_bytes=memory,  # now, as the local pool's; the peak is the summary's
            pids={"driver": os.getpid()},
            error=error,
        ).to_dict()
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
