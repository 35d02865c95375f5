"""The Ray engine: a report's batches read and encoded by tasks on a Ray cluster.

One module per job, each importing only those above it:

- ``tasks.py``: what runs on the cluster. The batch job
  (:func:`ashstream.batch_job.encode_batch`, the function the local transformers run)
  once per batch; for a Parquet source whose rows need no ordered stage, reading too,
  a part of whole row groups per task, with the driver's own code.
- ``cluster.py``: joining a cluster or starting a local Ray, and a failure to do
  either in one line, with nothing of a failed start left running.
- ``driver.py``: the driver's scheduler (:class:`RayStream`): opens the source, sends
  batches or parts as tasks with backpressure, takes the results back in source order
  and merges them with the same :class:`~ashstream.chunks.OrderedMerge` as every engine.
- ``pool.py``: :class:`RayPool`, which opens the cluster, starts streams and publishes
  them for ``ashstream status``.
"""

from __future__ import annotations

from ashstream.engines.ray.cluster import check_reachable, cluster_address
from ashstream.engines.ray.driver import RayStream, reads_on_cluster
from ashstream.engines.ray.pool import RayPool
from ashstream.engines.ray.tasks import encode_task

# The name benchmarks/bench_ray_model.py imports the encode task by.
_encode_task = encode_task

__all__ = ["RayPool", "RayStream", "check_reachable", "cluster_address", "reads_on_cluster"]
