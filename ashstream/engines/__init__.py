"""The engines that run the batch job: in this process (``inline``), a pool of local
processes over shared memory (``local``), and a Ray cluster (``ray``)."""
