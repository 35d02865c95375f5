"""The floor under a whole ``ashstream run``: read the same Parquet into Arrow with
pyarrow and write the module's bytes to a file, in a process of its own.

    python benchmarks/_floor.py SALES.parquet MODULE.typ OUT

No encoding at all: what is left of a run if encoding cost nothing.
"""

from __future__ import annotations

import sys

import pyarrow.parquet as pq


def main(parquet: str, module: str, out: str) -> None:
    for _ in pq.ParquetFile(parquet).iter_batches(batch_size=65_536):
        pass
    with open(module, "rb") as source, open(out, "wb") as sink:
        while piece := source.read(1 << 24):
            sink.write(piece)


if __name__ == "__main__":
    main(*sys.argv[1:4])
