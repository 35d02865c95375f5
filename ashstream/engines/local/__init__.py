"""The local engine: producer and transformer processes of one machine, batches and
results in shared memory, supervised by the parent (``pool.StreamPool``)."""
