"""The whole pipeline, Parquet in, Typst rows out to a file, against peers in one run.

    python benchmarks/bench_pipeline.py [--rows 1000000,10000000] [--repeats 3] [--quick]
    python benchmarks/bench_pipeline.py --analysis [--rows ...]

Each case runs once to warm up, then --repeats times; the median is reported. The full
run takes about 20 minutes on two cores.

``--analysis`` measures instead what groups, variables and a chart cost (2 workers,
the cases interleaved round by round):
plain encoding; the same rows ordered as the groups need (DuckDB sorts in the
producer); 2 group levels, 4 variables (one of them running, so the rows gain a
column) and a chart on those ordered rows; the same without the running variable;
the same plus an exact median per month, a sketched p95 per month or a top-5 per
region, each beside DuckDB computing just those per-group values in one query (2
threads, in this process); and, on a copy of the file written in group order, plain
encoding and the analysis with ``source.sorted: true`` (no sort).
It writes benchmarks/results/bench_analysis.json.

Other modes, each with a results file of its own: ``--small`` and ``--whole`` (whole
``ashstream run`` processes against a DuckDB process, at 10k-1M and at 2M/10M rows),
``--first-chunk`` (a warm pool's first chunk), ``--concurrent`` (20 streams on one
pool), ``--template`` (a user template's PDF) and ``--engine ray``.

Cases, each reading the same Parquet file and writing the same text (checked by SHA-256):

* ashstream with 1 and 2 transformer workers (a warm StreamPool);
* DuckDB building the literals in SQL with 1 and 2 threads;
* multiprocessing.Pool(2) that pickles batches to workers and results back, either as
  one bytes object per batch or, the common way, as a list of str rows;
* the encoder alone in this process (pyarrow reads, encode_rows_text, write).

Also the peak memory of the whole process tree (sum of PSS, sampled every 50 ms) and the
time to the first chunk on a warm pool. Prints a table; writes
benchmarks/results/bench_pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _duckdb_peer import write_literals
from _harness import compile_ashstream, print_table, write_results
from _sales import SALES_SQL

from ashstream import StreamPool, load_report
from ashstream.encode import encode_rows, encode_rows_text

CHUNK_SIZE = 10_000
DEFAULT_ROWS = "1000000,10000000"


class PeakPss:
    """Samples the PSS of this process and its children from a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)


def run_ashstream(pool: StreamPool, report_path: Path, out: Path) -> None:
    with open(out, "wb") as f:
        for chunk in pool.stream(report_path, chunk_size=CHUNK_SIZE):
            f.write(chunk.text)


def _pool_encode(ipc: bytes) -> bytes:
    batch = pa.ipc.open_stream(pa.py_buffer(ipc)).read_next_batch()
    return encode_rows_text(batch)[0].to_pybytes()


def _pool_encode_rows(ipc: bytes) -> list[str]:
    batch = pa.ipc.open_stream(pa.py_buffer(ipc)).read_next_batch()
    return encode_rows(batch).to_pylist()


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def run_mp_pool(parquet: Path, out: Path, processes: int) -> None:
    batches = (_ipc(b) for b in pq.ParquetFile(parquet).iter_batches(batch_size=CHUNK_SIZE))
    with mp.get_context("forkserver").Pool(processes) as pool, open(out, "wb") as f:
        for text in pool.imap(_pool_encode, batches):
            f.write(text)


def run_mp_pool_rows(parquet: Path, out: Path, processes: int) -> None:
    """The common way: each worker returns its rows as a list of str, pickled back."""
    batches = (_ipc(b) for b in pq.ParquetFile(parquet).iter_batches(batch_size=CHUNK_SIZE))
    with mp.get_context("forkserver").Pool(processes) as pool, open(out, "wb") as f:
        for rows in pool.imap(_pool_encode_rows, batches):
            f.write("".join(row + ",\n" for row in rows).encode())


def run_single_process(parquet: Path, out: Path) -> None:
    with open(out, "wb") as f:
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=CHUNK_SIZE):
            f.write(encode_rows_text(batch)[0])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def measure(fn, repeats: int) -> dict:
    fn()  # warm-up, discarded
    times, peaks = [], []
    for _ in range(repeats):
        with PeakPss() as sampler:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peaks.append(sampler.peak_bytes)
    return {"wall_s": statistics.median(times), "runs_s": times, "peak_pss_bytes": max(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200k rows, 1 repeat")
    parser.add_argument("--analysis", action="store_true", help="the cost of groups etc.")
    parser.add_argument(
        "--small", action="store_true", help="whole processes on small reports (--rows 10000,...)"
    )
    parser.add_argument(
        "--whole", action="store_true", help="the same at 2M and 10M rows (--rows to change)"
    )
    parser.add_argument(
        "--template", action="store_true", help="a user template on the example report"
    )
    parser.add_argument(
        "--first-chunk", action="store_true", help="time to a new stream's first chunk"
    )
    parser.add_argument(
        "--concurrent", action="store_true", help="20 streams at once against one alone"
    )
    parser.add_argument(
        "--engine",
        choices=["ray"],
        help="ray: the local engine against the Ray engine (--rows 2000000,10000000)",
    )
    args = parser.parse_args()
    compile_ashstream()
    if args.engine == "ray":
        rows = [2_000_000, 10_000_000] if args.rows == DEFAULT_ROWS else None
        measure_ray(rows or [int(n) for n in args.rows.split(",")], args.repeats)
        return
    if args.concurrent:
        measure_concurrent(args.repeats)
        return
    if args.first_chunk:
        measure_first_chunk(10 if args.repeats == 3 else args.repeats)
        return
    if args.template:
        measure_template(args.repeats)
        return
    if args.small or args.whole:
        default = [10_000, 100_000, 300_000, 1_000_000] if args.small else [2_000_000, 10_000_000]
        rows = default if args.rows == DEFAULT_ROWS else [int(n) for n in args.rows.split(",")]
        measure_small(rows, args.repeats, "bench_small" if args.small else "bench_whole")
        return
    sizes = [200_000] if args.quick else [int(n) for n in args.rows.split(",")]
    repeats = 1 if args.quick else args.repeats
    results: dict = {"chunk_size": CHUNK_SIZE, "sizes": {}}
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    measure = measure_analysis if args.analysis else measure_size
    try:
        for rows in sizes:
            results["sizes"][str(rows)] = measure(rows, workdir, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.analysis:
        report_analysis(results)
    else:
        report_results(results)


GROUPS = """
groups:
  - {name: region, field: region}
  - {name: month, expr: "date_trunc('month', day)"}
"""
VARIABLES = """
variables:
  - {name: region_total, function: sum, field: amount, reset: region}
  - {name: orders, function: count, reset: report}
  - {name: avg_amount, function: avg, field: amount, reset: month}
  - {name: running, function: sum, field: amount, reset: region, running: true}
charts:
  - {name: daily_revenue, x: day, y: amount, agg: sum, bucket: auto, points: 500}
"""
SORTED = "  sorted: true\n"
MEDIAN = "  - {name: median_price, function: median, field: price, reset: month}\n"
P95 = (
    "  - {name: p95_price, function: quantile, q: 0.95, method: sketch, field: price, "
    "reset: month}\n"
)
TOP = "  - {name: top_qty, function: top, n: 5, field: qty, reset: region}\n"
# DuckDB computing what each added variable adds, per group, in one query (2 threads).
MONTHS = "SELECT region, date_trunc('month', day) AS month, {} FROM '{}' GROUP BY ALL"
DUCKDB_ANALYSIS = {
    "DuckDB: quantile_cont per month": MONTHS.format("quantile_cont(price, 0.5)", "{}"),
    "DuckDB: approx_quantile per month": MONTHS.format("approx_quantile(price, 0.95)", "{}"),
    "DuckDB: top-5 per region": (
        "SELECT region, list(qty ORDER BY n DESC, qty)[1:5] FROM "
        "(SELECT region, qty, count(*) AS n FROM '{}' GROUP BY ALL) GROUP BY region"
    ),
}
# case -> (the file: as generated, or written in group order; what the report adds)
ANALYSIS_CASES = {
    "plain encoding": ("", ""),
    "ordered as the groups": ("", "  order_by: [region, \"date_trunc('month', day)\"]\n"),
    "2 groups, 4 variables, 1 chart": ("", GROUPS + VARIABLES),
    "the same, no running variable": (
        "",
        GROUPS + VARIABLES.replace("running: true", "running: false"),
    ),
    "+ exact median per month": ("", GROUPS + VARIABLES.replace("charts:", MEDIAN + "charts:")),
    "+ sketched p95 per month": ("", GROUPS + VARIABLES.replace("charts:", P95 + "charts:")),
    "+ top-5 per region": ("", GROUPS + VARIABLES.replace("charts:", TOP + "charts:")),
    "plain encoding, file in group order": ("-sorted", ""),
    "2 groups, 4 variables, 1 chart, sorted: true": ("-sorted", SORTED + GROUPS + VARIABLES),
}


def measure_analysis(rows: int, workdir: Path, repeats: int) -> dict:
    parquet = workdir / f"sales-{rows}.parquet"
    in_order = workdir / f"sales-{rows}-sorted.parquet"
    con = duckdb.connect()
    con.execute(f"COPY ({SALES_SQL.format(rows=rows)}) TO '{parquet}' (FORMAT parquet)")
    con.execute(
        f"COPY (SELECT * FROM '{parquet}' ORDER BY region, date_trunc('month', day)) "
        f"TO '{in_order}' (FORMAT parquet)"
    )
    reports = {}
    for i, (name, (suffix, extra)) in enumerate(ANALYSIS_CASES.items()):
        reports[name] = workdir / f"case{i}-{rows}.yaml"
        source = f"sales-{rows}{suffix}.parquet"
        reports[name].write_text(f"name: case{i}\nsource:\n  parquet: {source}\n{extra}")
        load_report(reports[name])
    runs: dict[str, list] = {name: [] for name in reports}
    target = workdir / "case.typ"
    with StreamPool(2) as pool:
        # Round by round, every case once, so that the machine's drift hits all alike;
        # the first round warms up and is discarded.
        for round_ in range(repeats + 1):
            print(f"  {rows:,} rows: round {round_} of {repeats} …", file=sys.stderr, flush=True)
            for name, report in reports.items():
                with PeakPss() as sampler:
                    start = time.perf_counter()
                    run_ashstream(pool, report, target)
                    seconds = time.perf_counter() - start
                if round_:
                    runs[name].append((seconds, sampler.peak_bytes, os.path.getsize(target)))
    target.unlink()
    in_order.unlink()
    for name, sql in DUCKDB_ANALYSIS.items():
        con = duckdb.connect(config={"threads": 2})
        query = sql.format(parquet)
        con.execute(query).fetchall()  # warm: the file in the page cache
        for _ in range(repeats):
            start = time.perf_counter()
            con.execute(query).fetchall()
            runs.setdefault(name, []).append((time.perf_counter() - start, 0, 0))
    parquet.unlink()
    measured = {}
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        measured[name] = {
            "wall_s": wall,
            "runs_s": [r[0] for r in results],
            "rows_per_s": rows / wall,
            "peak_pss_bytes": max(r[1] for r in results),
            "output_bytes": results[0][2],
        }
    return {"cases": measured, "repeats": repeats}


def report_analysis(results: dict) -> None:
    for rows, entry in results["sizes"].items():
        cases = entry["cases"]
        ordered = cases["ordered as the groups"]["wall_s"]
        analysed = cases["2 groups, 4 variables, 1 chart"]["wall_s"]
        print(f"\n{int(rows):,} rows from Parquet, 2 workers; median of {entry['repeats']} run(s)")
        table = []
        for name, c in cases.items():
            if name in DUCKDB_ANALYSIS:
                table.append([name, f"{c['wall_s']:.2f}", "", "", "", "", ""])
                continue
            in_order = ANALYSIS_CASES[name][0] == "-sorted"
            plain = cases["plain encoding, file in group order" if in_order else "plain encoding"]
            added = name.startswith("+ ")
            table.append(
                [
                    name,
                    f"{c['wall_s']:.2f}",
                    f"{c['rows_per_s']:,.0f}",
                    "" if in_order else f"{c['wall_s'] / ordered - 1:+.0%}",
                    f"{c['wall_s'] / plain['wall_s'] - 1:+.0%}",
                    f"{c['wall_s'] / analysed - 1:+.0%}" if added else "",
                    f"{c['peak_pss_bytes'] / 2**20:,.0f}",
                ]
            )
        print_table(
            [
                "case",
                "median s",
                "rows/s",
                "vs ordered",
                "vs plain, same file",
                "vs the 4 variables",
                "peak PSS MiB",
            ],
            table,
        )
    path = write_results("bench_analysis", results)
    print(f"\nwrote {path}")


def measure_size(rows: int, workdir: Path, repeats: int) -> dict:
    parquet, report = sales_files(workdir, rows)
    out = {n: workdir / f"{n}-{rows}.typ" for n in ("a1", "a2", "d1", "d2", "mp", "mpr", "single")}

    def progress(name: str) -> None:
        print(f"  {rows:,} rows: {name} …", file=sys.stderr, flush=True)

    measured, first = {}, []
    for workers in (1, 2):
        name = f"ashstream, {workers} worker{'s' if workers > 1 else ''}"
        progress(name)
        # One pool at a time, started before the timing (warm), so that the PSS samples
        # hold only the pool being measured.
        with StreamPool(workers) as pool:
            target = out[f"a{workers}"]
            measured[name] = measure(lambda: run_ashstream(pool, report, target), repeats)  # noqa: B023
            if workers == 2:
                for _ in range(5):
                    time.sleep(1)  # warm: idle, its next producer started and imported
                    start = time.perf_counter()
                    stream = pool.stream(report, chunk_size=1000)
                    next(stream)
                    first.append(time.perf_counter() - start)
                    stream.close()
    peers = {
        "DuckDB SQL, 1 thread": lambda: write_literals(str(parquet), str(out["d1"]), 1),
        "DuckDB SQL, 2 threads": lambda: write_literals(str(parquet), str(out["d2"]), 2),
        "multiprocessing.Pool(2), bytes": lambda: run_mp_pool(parquet, out["mp"], 2),
        "multiprocessing.Pool(2), str rows": lambda: run_mp_pool_rows(parquet, out["mpr"], 2),
        "encoder alone, 1 process": lambda: run_single_process(parquet, out["single"]),
    }
    for name, fn in peers.items():
        progress(name)
        measured[name] = measure(fn, repeats)
    for case in measured.values():
        case["rows_per_s"] = rows / case["wall_s"]
    entry = {
        "cases": measured,
        "identical_outputs": len({sha256(p) for p in out.values()}) == 1,
        "output_bytes": os.path.getsize(out["a2"]),
        "first_chunk_s": statistics.median(first),
        "repeats": repeats,
    }
    for path in out.values():
        path.unlink()
    parquet.unlink()
    return entry


def report_results(results: dict) -> None:
    for rows, entry in results["sizes"].items():
        cases = entry["cases"]
        duck2 = cases["DuckDB SQL, 2 threads"]["rows_per_s"]
        print(
            f"\n{int(rows):,} rows from Parquet, chunks of {results['chunk_size']:,}; median of "
            f"{entry['repeats']} run(s); outputs identical: {entry['identical_outputs']}; "
            f"{entry['output_bytes'] / 2**20:,.0f} MiB of Typst"
        )
        print_table(
            ["case", "median s", "rows/s", "x DuckDB 2 thr", "peak PSS MiB"],
            [
                [
                    name,
                    f"{c['wall_s']:.2f}",
                    f"{c['rows_per_s']:,.0f}",
                    f"{c['rows_per_s'] / duck2:.2f}",
                    f"{c['peak_pss_bytes'] / 2**20:,.0f}",
                ]
                for name, c in cases.items()
            ],
        )
        a1, a2 = cases["ashstream, 1 worker"], cases["ashstream, 2 workers"]
        pool = cases["multiprocessing.Pool(2), bytes"]
        rows_pool = cases["multiprocessing.Pool(2), str rows"]
        print(
            f"2 workers / 1 worker: {a2['rows_per_s'] / a1['rows_per_s']:.2f}x; "
            f"ashstream(2) / Pool(2) bytes: {a2['rows_per_s'] / pool['rows_per_s']:.2f}x, "
            f"/ Pool(2) str rows: {a2['rows_per_s'] / rows_pool['rows_per_s']:.2f}x; "
            f"first chunk on a warm pool: {entry['first_chunk_s'] * 1000:.0f} ms"
        )
    sizes = list(results["sizes"])
    if len(sizes) > 1:
        small, big = (
            results["sizes"][s]["cases"]["ashstream, 2 workers"] for s in (sizes[0], sizes[-1])
        )
        ratio = big["peak_pss_bytes"] / small["peak_pss_bytes"]
        results["peak_ratio_largest_to_smallest"] = ratio
        print(
            f"\nashstream(2) peak memory at {int(sizes[-1]):,} rows / at {int(sizes[0]):,}: {ratio:.2f}x"
        )
    path = write_results("bench_pipeline", results)
    print(f"\nwrote {path}")


def measure_small(sizes: list[int], repeats: int, results_name: str) -> None:
    """What a user of ``ashstream run`` feels: whole processes, start-up included.

    Per size: ``ashstream run`` with its defaults under each encoder (native, and the
    reference via ASHSTREAM_ENCODER), in the calling process (``--inline-rows`` at the
    size), with a pool of 2 workers (``--inline-rows 0``) and of 1 (``--workers 1``);
    the peers a user would pick instead, each a process of its own with 2 threads:
    DuckDB writing the same row literals, and DuckDB's ``COPY … TO 'rows.json'``; and
    the floor: pyarrow reading the same Parquet into Arrow plus writing the module's
    bytes to a file. Cases alternate round by round after one discarded warm-up round;
    medians. The module's rows must equal DuckDB's text, every ashstream module must be
    byte-identical.
    """
    here = Path(__file__).resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    results: dict = {"sizes": {}}
    reference = {**os.environ, "ASHSTREAM_ENCODER": "reference"}
    try:
        for rows in sizes:
            parquet, report = sales_files(workdir, rows)
            ashstream = [sys.executable, "-m", "ashstream", "run", str(report), "-q", "-o"]
            modules = {
                "ashstream run (defaults)": ([*ashstream, str(workdir / "run.typ")], None),
                "ashstream run (defaults), reference encoder": (
                    [*ashstream, str(workdir / "run-reference.typ")],
                    reference,
                ),
                "ashstream run, in this process": (
                    [*ashstream, str(workdir / "inline.typ"), "--inline-rows", str(rows)],
                    None,
                ),
                "ashstream run, a pool of 2": (
                    [*ashstream, str(workdir / "pool.typ"), "--inline-rows", "0"],
                    None,
                ),
                "ashstream run, a pool of 1 worker": (
                    [*ashstream, str(workdir / "pool1.typ"), "--workers", "1"],
                    None,
                ),
            }
            peers = {
                "DuckDB SQL literals, 2 threads": (
                    [
                        sys.executable,
                        str(here / "_duckdb_peer.py"),
                        str(parquet),
                        str(workdir / "duckdb.txt"),
                        "2",
                    ],
                    None,
                ),
                "DuckDB COPY TO json, 2 threads": (
                    [
                        sys.executable,
                        str(here / "_duckdb_peer.py"),
                        str(parquet),
                        str(workdir / "rows.json"),
                        "2",
                        "json",
                    ],
                    None,
                ),
                "floor: pyarrow read + write the bytes": (
                    [
                        sys.executable,
                        str(here / "_floor.py"),
                        str(parquet),
                        str(workdir / "run.typ"),
                        str(workdir / "floor.typ"),
                    ],
                    None,
                ),
            }
            commands = {**modules, **peers}
            times: dict[str, list[float]] = {name: [] for name in commands}
            for round_ in range(repeats + 1):
                for name, (command, env) in commands.items():
                    started = time.perf_counter()
                    subprocess.run(command, check=True, env=env)
                    if round_:
                        times[name].append(time.perf_counter() - started)
            first = (workdir / "run.typ").read_bytes()
            for name, (command, _) in modules.items():
                assert (Path(command[command.index("-o") + 1])).read_bytes() == first, name
            assert (workdir / "floor.typ").read_bytes() == first
            start, end = first.index(b"#let rows = (\n") + 14, first.index(b")\n#let groups")
            assert first[start:end] == (workdir / "duckdb.txt").read_bytes(), "rows differ"
            peer = statistics.median(times["DuckDB COPY TO json, 2 threads"])
            results["sizes"][str(rows)] = {
                name: {
                    "wall_s": statistics.median(runs),
                    "runs_s": runs,
                    "rows_per_s": rows / statistics.median(runs),
                    "x_duckdb_json_speed": peer / statistics.median(runs),
                }
                for name, runs in times.items()
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = [
        [
            f"{int(rows):,}",
            name,
            f"{c['wall_s']:.2f}",
            f"{c['rows_per_s'] / 1e6:.2f}",
            f"{c['x_duckdb_json_speed']:.2f}",
        ]
        for rows, cases in results["sizes"].items()
        for name, c in cases.items()
    ]
    print_table(["rows", "case", "median wall s", "M rows/s", "speed x DuckDB's JSON"], table)
    path = write_results(results_name, results)
    print(f"\nwrote {path}")


# Reads every row it is given, lays out a table of the first hundred.
USER_TEMPLATE = """#import sys.inputs.data: rows, meta
= #meta.name: #rows.len() of #meta.row_count rows
#let first = rows.slice(0, calc.min(100, rows.len()))
#table(columns: 3, ..first.map(r => (str(r.id), r.region, str(r.amount))).flatten())
"""


def measure_template(repeats: int) -> None:
    """A user template on examples/sales.yaml: the run without a PDF, with a template
    that reads the bounded module (the default), and with ``template_rows: all`` on
    fewer rows (Typst needs a minute and ~9 GiB for a million), whole processes,
    alternating; medians of wall time and of the tree's peak PSS."""
    example = Path(__file__).resolve().parent.parent / "examples" / "sales.yaml"
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    try:
        (workdir / "user.typ").write_text(USER_TEMPLATE)
        spec = example.read_text().replace("\noutput:", "\noutput_of_example:")
        head = spec.split("\noutput_of_example:")[0]
        cases = {}
        for name, rows, template in (
            ("no PDF", 1_000_000, None),
            ("user template, bounded (default)", 1_000_000, "template: user.typ\n"),
            ("no PDF", 200_000, None),
            (
                "user template, template_rows: all",
                200_000,
                "template: user.typ\n  template_rows: all\n",
            ),
        ):
            n = len(cases)
            report = workdir / f"{n}.yaml"
            output = "\noutput:\n  " + (template or "typst: x.typ\n")
            text = head.replace("default: 1000000", f"default: {rows}")
            report.write_text(text + output + "pipeline:\n  chunk_size: 10000\n")
            pdf = ["--pdf", str(workdir / f"{n}.pdf")] if template else []
            run = ["run", str(report), "-q", "-o", str(workdir / f"{n}.typ"), *pdf]
            cases[f"{name}, {rows // 1000}k rows"] = (
                rows,
                [sys.executable, "-m", "ashstream", *run],
            )
        times: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, list[int]] = {name: [] for name in cases}
        for round_ in range(repeats + 1):
            for name, (_, command) in cases.items():
                with PeakPss(0.5) as sampler:  # PSS walks page tables: sample rarely
                    started = time.perf_counter()
                    subprocess.run(command, check=True, cwd=workdir)
                    seconds = time.perf_counter() - started
                if round_:
                    times[name].append(seconds)
                    peaks[name].append(sampler.peak_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        name: {
            "rows": cases[name][0],
            "wall_s": statistics.median(times[name]),
            "runs_s": times[name],
            "peak_pss_bytes": statistics.median(peaks[name]),
        }
        for name in cases
    }
    print_table(
        ["case", "rows", "median wall s", "peak PSS MiB"],
        [
            [name, f"{r['rows']:,}", f"{r['wall_s']:.2f}", f"{r['peak_pss_bytes'] / 2**20:,.0f}"]
            for name, r in results.items()
        ],
    )
    path = write_results("bench_template", {"cases": results})
    print(f"\nwrote {path}")


def measure_first_chunk(repeats: int) -> None:
    """Time to the first chunk of a new stream on a warm pool (2 workers, chunks of
    1000 rows), each after the pool sat idle for a moment, as a service answering
    requests would see it; median of ``repeats``. On a 10,000-row Parquet file and on a
    1M-row one: DuckDB's COPY writes row groups of 122,880 rows with one page per
    column, so any reader decompresses the whole first row group before its first row.
    Beside each, the floor under it: DuckDB's own first 1000 rows of the same file on a
    connection made in advance (what the producer has), and pyarrow's reader's.
    """
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    results = {}
    try:
        files = {rows: sales_files(workdir, rows) for rows in (10_000, 1_000_000)}
        with StreamPool(2) as pool:
            for rows, (parquet, report) in files.items():
                cases: dict[str, list[float]] = {
                    "ashstream, warm pool": [],
                    "DuckDB's first batch": [],
                    "pyarrow's first batch": [],
                }
                for round_ in range(repeats + 1):
                    time.sleep(0.5)
                    start = time.perf_counter()
                    stream = pool.stream(report, chunk_size=1000)
                    next(stream)
                    took = [time.perf_counter() - start]
                    stream.close()
                    time.sleep(0.5)  # the pool's children idle again
                    took.append(_duckdb_first_batch(parquet))
                    start = time.perf_counter()
                    next(pq.ParquetFile(parquet).iter_batches(batch_size=1000))
                    took.append(time.perf_counter() - start)
                    if round_:  # the first round of each file is discarded
                        for name, seconds in zip(cases, took, strict=True):
                            cases[name].append(seconds)
                results[str(rows)] = {
                    name: {"median_s": statistics.median(runs), "runs_s": runs}
                    for name, runs in cases.items()
                }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(
        ["file rows", "case", "median ms", "runs ms"],
        [
            [
                f"{int(rows):,}",
                name,
                f"{case['median_s'] * 1000:.1f}",
                " ".join(f"{t * 1000:.0f}" for t in case["runs_s"]),
            ]
            for rows, cases in results.items()
            for name, case in cases.items()
        ],
    )
    write_results("bench_first_chunk", {"files": results})


def _duckdb_first_batch(parquet: Path) -> float:
    """Seconds to DuckDB's first 1000 rows of ``parquet`` (one thread, as the producer
    reads), on a connection made beforehand."""
    con = duckdb.connect()
    con.execute("SET threads = 1").fetchall()
    start = time.perf_counter()
    reader = con.sql(f"SELECT * FROM read_parquet('{parquet}')").to_arrow_reader(batch_size=1000)
    next(iter(reader))
    took = time.perf_counter() - start
    del reader
    con.close()
    return took


def sales_files(workdir: Path, rows: int) -> tuple[Path, Path]:
    """A Parquet file of ``rows`` rows of the sales schema and a report reading it."""
    parquet = workdir / f"sales-{rows}.parquet"
    duckdb.connect().execute(
        f"COPY ({SALES_SQL.format(rows=rows)}) TO '{parquet}' (FORMAT parquet)"
    )
    report = workdir / f"sales-{rows}.yaml"
    report.write_text(f"name: sales\nsource:\n  parquet: {parquet.name}\n")
    load_report(report)  # fail early on a bad definition
    return parquet, report


def measure_concurrent(repeats: int, streams: int = 20, rows: int = 200_000) -> None:
    """One pool (2 workers): one stream alone, then ``streams`` streams at once from as
    many threads, each of ``rows`` rows of the sales schema; peak PSS of the tree and
    wall time, medians of ``repeats`` after a warm-up stream."""
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    try:
        _, report = sales_files(workdir, rows)
        one, many = [], []
        with StreamPool(2) as pool:

            def consume() -> None:
                for _ in pool.stream(report, chunk_size=CHUNK_SIZE):
                    pass

            consume()
            for _ in range(repeats):
                for results, count in ((one, 1), (many, streams)):
                    time.sleep(0.5)
                    threads = [threading.Thread(target=consume) for _ in range(count)]
                    with PeakPss(0.05) as sampler:
                        start = time.perf_counter()
                        for thread in threads:
                            thread.start()
                        for thread in threads:
                            thread.join()
                        results.append((time.perf_counter() - start, sampler.peak_bytes))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall_one = statistics.median(t for t, _ in one)
    wall_many = statistics.median(t for t, _ in many)
    peak_one = statistics.median(p for _, p in one)
    peak_many = statistics.median(p for _, p in many)
    print(
        f"1 stream: {wall_one:.2f} s, peak {peak_one / 2**20:,.0f} MiB; {streams} streams: "
        f"{wall_many:.2f} s, peak {peak_many / 2**20:,.0f} MiB; memory {peak_many / peak_one:.2f}x, "
        f"throughput {streams * wall_one / wall_many:.2f}x one stream's"
    )
    write_results(
        "bench_concurrent",
        {
            "streams": streams,
            "rows_per_stream": rows,
            "one": {"wall_s": wall_one, "peak_pss_bytes": peak_one, "runs": one},
            "many": {"wall_s": wall_many, "peak_pss_bytes": peak_many, "runs": many},
        },
    )


# The Ray engine's two read paths: Parquet read by tasks on the cluster, and the same
# rows sorted by DuckDB (order_by), which the driver reads (the local engine sorts too).
RAY_CASES = {"read on the cluster": "", "order_by: driver reads": "  order_by: [id]\n"}


def measure_ray(sizes: list[int], repeats: int) -> None:
    """The local engine (a warm StreamPool, 2 workers) against the Ray engine (a local
    Ray of this machine's CPUs, started once) on the sales file, for each of
    ``RAY_CASES``; rounds alternate the two engines, and both must write the same text
    (checked). Wall time and rows/s are medians of rounds run without the memory
    sampler (reading every process's smaps costs CPU, and Ray has more processes);
    one more round each gives the peak PSS of the whole process tree (Ray's raylet,
    GCS, workers and object store pages are children of this process) and the Ray
    driver's own peak memory, less shared pages."""
    from ashstream.engines.ray import RayPool

    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    results: dict = {"chunk_size": CHUNK_SIZE, "cases": {}}
    try:
        with StreamPool(2) as local, RayPool() as on_ray:
            for rows in sizes:
                parquet, _ = sales_files(workdir, rows)
                for case, extra in RAY_CASES.items():
                    report = workdir / "case.yaml"
                    report.write_text(f"name: sales\nsource:\n  parquet: {parquet.name}\n{extra}")
                    results["cases"][f"{rows} rows, {case}"] = _engines_side_by_side(
                        {"local": local, "ray": on_ray}, report, rows, repeats, workdir
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'case':>40} {'engine':>7} {'wall s':>7} {'rows/s':>10} {'tree PSS':>9} {'ratio':>6}")
    for name, case in results["cases"].items():
        for engine in ("local", "ray"):
            r = case[engine]
            ratio = r["rows_per_s"] / case["local"]["rows_per_s"]
            print(
                f"{name:>40} {engine:>7} {r['wall_s']:>7.2f} {r['rows_per_s']:>10,.0f} "
                f"{r['peak_pss_bytes'] / 2**20:>7,.0f} M {ratio:>5.2f}x"
            )
        driver = case["ray"]["driver_peak_bytes"] / 2**20
        print(f"{'':>40} Ray driver's peak memory (unshared): {driver:,.0f} MiB")
    path = write_results("bench_ray", results)
    print(f"\nwrote {path}")


def _engines_side_by_side(
    pools: dict, report: Path, rows: int, repeats: int, workdir: Path
) -> dict:
    digests: dict = {}
    times: dict = {name: [] for name in pools}
    peaks: dict = {name: 0 for name in pools}
    pools["ray"].peak_memory_bytes = 0  # the driver's peak for this case alone
    for round_ in range(repeats + 2):
        for name, pool in pools.items():
            out = workdir / f"{name}.typ"
            sampled = round_ == repeats + 1
            with PeakPss() if sampled else contextlib.nullcontext() as sampler:
                start = time.perf_counter()
                with open(out, "wb") as f:
                    for chunk in pool.stream(report, chunk_size=CHUNK_SIZE):
                        f.write(chunk.text)
                wall = time.perf_counter() - start
            digests[name] = sha256(out)
            if sampled:
                peaks[name] = sampler.peak_bytes
            elif round_:  # the first round warms both up
                times[name].append(wall)
    if len(set(digests.values())) != 1:
        raise SystemExit(f"{report}: the engines wrote different text")
    result = {
        name: {
            "wall_s": statistics.median(times[name]),
            "runs_s": times[name],
            "rows_per_s": rows / statistics.median(times[name]),
            "peak_pss_bytes": peaks[name],
        }
        for name in pools
    }
    result["ray"]["driver_peak_bytes"] = pools["ray"].peak_memory_bytes
    return result


if __name__ == "__main__":
    main()
