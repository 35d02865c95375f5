"""Rows/s of the encoder on one core — the compiled one and the pyarrow reference —
against DuckDB building the same literals in SQL (threads=1) and a plain per-row Python
loop, on a 10-column "sales" schema, in batches of the pipeline's size (16,384 rows).

    python benchmarks/bench_encode.py [--rows 1000000] [--repeats 5] [--quick]

Prints a table and writes benchmarks/results/bench_encode.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import median_seconds, print_table, write_results
from _sales import SALES_SQL, duckdb_query

from ashstream import encode, encode_array, encode_native, encode_rows, encode_value
from ashstream.batch_job import MIN_BATCH_ROWS


def python_loop(table: pa.Table) -> list[str]:
    names = table.column_names
    keys = [encode_value(n) for n in names]
    return [
        "("
        + ", ".join(f"{k}: {encode_value(v)}" for k, v in zip(keys, row.values(), strict=True))
        + ")"
        for row in table.to_pylist()
    ]


def encode_each(batches: list[pa.RecordBatch]) -> None:
    """Each batch's text, dropped before the next, as a transformer drops it once it is
    in its slot: keeping them all would measure fresh pages (a fault per 4 KiB) more
    than the encoder."""
    for batch in batches:
        encode.encode_rows_text(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--python-rows", type=int, default=100_000, help="rows for the (slow) per-row Python loop"
    )
    parser.add_argument("--quick", action="store_true", help="50k rows, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats, args.python_rows = 50_000, 2, 20_000

    pa.set_cpu_count(1)
    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.execute(f"CREATE TABLE sales AS {SALES_SQL.format(rows=args.rows)}")
    table = con.sql("SELECT * FROM sales").to_arrow_table().combine_chunks()
    query = duckdb_query()

    batches = [
        b
        for start in range(0, args.rows, MIN_BATCH_ROWS)
        for b in table.slice(start, MIN_BATCH_ROWS).to_batches()
    ]
    theirs = con.sql(query).to_arrow_table()["row"].combine_chunks().cast(pa.string())
    available = ["native", "reference"] if encode_native.available() else ["reference"]
    identical = {}
    cases = {}
    for name in available:
        encode._ENCODER = name
        identical[name] = encode_rows(table).equals(theirs)
        t, runs = median_seconds(lambda: encode_each(batches), args.repeats)
        cases[f"ashstream {name} encoder"] = {"rows": args.rows, "wall_s": t, "runs_s": runs}
    t, runs = median_seconds(lambda: con.sql(query).to_arrow_table(), args.repeats)
    cases["DuckDB SQL (threads=1)"] = {"rows": args.rows, "wall_s": t, "runs_s": runs}
    small = table.slice(0, args.python_rows)
    t, runs = median_seconds(lambda: python_loop(small), max(1, args.repeats // 2))
    cases["Python per-row loop"] = {"rows": args.python_rows, "wall_s": t, "runs_s": runs}
    duck_rate = args.rows / cases["DuckDB SQL (threads=1)"]["wall_s"]
    for case in cases.values():
        case["rows_per_s"] = case["rows"] / case["wall_s"]
        case["vs_duckdb"] = case["rows_per_s"] / duck_rate

    columns = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        columns[name] = {"type": str(col.type)}
        for encoder in available:
            encode._ENCODER = encoder
            t, _ = median_seconds(
                lambda col=col, name=name: encode_array(col, name=name), args.repeats
            )
            columns[name][f"{encoder}_ns_per_row"] = t / args.rows * 1e9
    print(
        f"the encoder on one core, {args.rows:,} rows x 10 columns in batches of "
        f"{MIN_BATCH_ROWS:,}; median of {args.repeats} runs; output identical to DuckDB's: "
        f"{identical}\n"
    )
    print_table(
        ["case", "rows", "median s", "rows/s", "x DuckDB"],
        [
            [
                k,
                f"{v['rows']:,}",
                f"{v['wall_s']:.3f}",
                f"{v['rows_per_s']:,.0f}",
                f"{v['vs_duckdb']:.2f}",
            ]
            for k, v in cases.items()
        ],
    )
    print("\none column alone (encode_array), ns per row")
    print_table(
        ["column", "type", *available],
        [
            [k, v["type"], *(f"{v[f'{e}_ns_per_row']:.0f}" for e in available)]
            for k, v in columns.items()
        ],
    )
    path = write_results(
        "bench_encode",
        {
            "rows": args.rows,
            "repeats": args.repeats,
            "batch_rows": MIN_BATCH_ROWS,
            "identical_to_duckdb": identical,
            "cases": cases,
            "columns": columns,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
