"""The peers of a whole ``ashstream run``: DuckDB writes the same row literals to a file,
or (``json``) the rows as JSON with ``COPY … TO``, which Typst can read with ``json()``.

    python benchmarks/_duckdb_peer.py SALES.parquet OUT THREADS [json]

Run as a process of its own by bench_pipeline.py --small: start-up included, as a user
who chose plain DuckDB would pay it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sales import duckdb_query

BATCH_ROWS = 10_000


def write_literals(parquet: str, out: str, threads: int) -> None:
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute(f"CREATE VIEW sales AS SELECT * FROM read_parquet('{parquet}')")
    query = duckdb_query().replace("')') AS row", "'),\n') AS row")
    with open(out, "wb") as f:
        for batch in con.sql(query).to_arrow_reader(batch_size=BATCH_ROWS):
            column = batch.column(0).cast(pa.string())
            end = np.frombuffer(column.buffers()[1], np.int32, count=len(column) + 1)[-1]
            f.write(column.buffers()[2].slice(0, int(end)))


def write_json(parquet: str, out: str, threads: int) -> None:
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute(f"COPY (SELECT * FROM read_parquet('{parquet}')) TO '{out}' (FORMAT json)")


if __name__ == "__main__":
    write = write_json if sys.argv[4:] == ["json"] else write_literals
    write(sys.argv[1], sys.argv[2], int(sys.argv[3]))
