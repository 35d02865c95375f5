"""The incremental cache, as a user feels it: whole ``ashstream run`` processes over a
dataset of daily Parquet files in group order (``source.sorted: true``), with the
example's variables and charts (groups by month and day, as daily files order them).

Cases, alternating round by round, medians: a cold run without the cache, a cold run
with an empty cache, a re-run with nothing changed, a re-run after one day was
appended, and a re-run after a run killed (SIGKILL) at ~70 % of its units. Prints the
ratios to the cold run and the cache's size on disk per million rows, with floors
measured in the same rounds: copying the cold run's module with ``cp`` (what any re-run
that writes the module pays at least), the copy renamed over the module (what a re-run
that replaces it pays at least) and ``ashstream --version`` (start-up).

    python benchmarks/bench_cache.py --rows 10000000 --files 100 --rounds 3
    python benchmarks/bench_cache.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import yaml

DAY_SQL = """
COPY (SELECT
    ({day} * {rows} + i)::BIGINT AS id,
    'Order "' || (i % 9973) || '"' || chr(10) || 'line \\ two' AS note,
    ['central', 'east', 'north', 'south', 'west'][1 + (i * 5 // {rows})::INT] AS region,
    ((i * 7919) % 1000000 / 100.0)::DECIMAL(12, 2) AS amount,
    ((i * 104729) % 100000) / 7.0 AS price,
    (i % 1000)::INTEGER AS qty,
    DATE '2024-01-01' + {day} AS day,
    TIMESTAMP '2024-01-01' + INTERVAL ({day}) DAY + to_microseconds(i * 86400000000 // {rows})
        AS created,
    i % 3 = 0 AS paid,
    CASE WHEN i % 4 = 0 THEN NULL ELSE 'comment ' || (i % 101) END AS comment,
    1.1 + 0.05 * sin(i / 40000.0) AS fx_rate
FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet)
"""

REPORT = {
    "name": "daily",
    "source": {"parquet": "data/*.parquet", "sorted": True},
    "groups": [
        {"name": "month", "expr": "date_trunc('month', day)"},
        {"name": "day", "field": "day"},
    ],
    "variables": [
        {"name": "day_revenue", "function": "sum", "field": "amount", "reset": "day"},
        {"name": "day_orders", "function": "count", "reset": "day"},
        {"name": "revenue", "function": "sum", "field": "amount", "reset": "month"},
        {"name": "average_order", "function": "avg", "field": "amount", "reset": "month"},
        {"name": "median_order", "function": "median", "field": "amount", "reset": "month"},
        {
            "name": "p95_price",
            "function": "quantile",
            "q": 0.95,
            "method": "sketch",
            "field": "price",
            "reset": "day",
        },
        {
            "name": "running_revenue",
            "function": "sum",
            "field": "amount",
            "reset": "month",
            "running": True,
        },
        {"name": "total_orders", "function": "count"},
        {"name": "total_revenue", "function": "sum", "field": "amount"},
        {"name": "largest_order", "function": "max", "field": "amount"},
        {"name": "distinct_quantities", "function": "count_distinct", "field": "qty"},
        {"name": "top_quantities", "function": "top", "n": 3, "field": "qty"},
    ],
    "charts": [
        {"name": "weekly_revenue", "x": "day", "y": "amount", "agg": "sum", "points": 300},
        {
            "name": "revenue_by_region",
            "x": "day",
            "y": "amount",
            "agg": "sum",
            "bucket": "quarter",
            "series": "region",
        },
        {"name": "fx_rate", "x": "created", "y": "fx_rate", "agg": "none", "points": 400},
    ],
    "output": {"typst": "out/daily.typ"},
    "pipeline": {"chunk_size": 10000},
}


def ashstream(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ashstream", "run", str(folder / "report.yaml"), "-q", *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )


def timed(folder: Path, *args: str) -> float:
    os.sync()  # each case starts with the last one's write-back done, as a nightly run would
    started = time.perf_counter()
    process = ashstream(folder, *args)
    if process.wait() != 0:
        raise SystemExit(f"ashstream run {' '.join(args)} failed")
    return time.perf_counter() - started


def copied(out: Path, over: bool) -> float:
    """A whole process copying the module, as a re-run writing it at least must; with
    ``over``, the copy then renamed over the module, as a re-run replacing it does
    (the rename frees the replaced module: its cached pages and its blocks)."""
    module, copy = out / "daily.typ", out / "copy.typ"
    command = f'cp "{module}" "{copy}"' + (f' && mv -f "{copy}" "{module}"' if over else "")
    os.sync()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True)
    seconds = time.perf_counter() - started
    copy.unlink(missing_ok=True)
    return seconds


def started_up() -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ashstream", "--version"], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def cache_sizes(cache: Path, module: Path) -> tuple[int, int]:
    """The cache's bytes, and those of them that are the module's too (a hard link)."""
    files = [f for part in ("entries", "texts") for f in (cache / part).iterdir()]
    inode = module.stat().st_ino
    shared = sum(f.stat().st_size for f in files if f.stat().st_ino == inode)
    return sum(f.stat().st_size for f in files), shared


def entries(cache: Path) -> set[str]:
    return set(os.listdir(cache / "entries")) if (cache / "entries").exists() else set()


def killed_at(folder: Path, cache: Path, units: int, share: float) -> int:
    """Run until ``share`` of the units are in the cache, then SIGKILL the run."""
    process = ashstream(folder, "--cache", str(cache))
    while process.poll() is None and len(entries(cache)) < share * units:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return len(entries(cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200k rows, 20 files, 1 round")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.files, args.rounds = 200_000, 20, 1
    per_file = args.rows // args.files
    work = Path(tempfile.mkdtemp(prefix="ashstream-bench-cache-"))
    try:
        data, spare = work / "data", work / "spare"
        data.mkdir()
        spare.mkdir()
        con = duckdb.connect()
        for day in range(args.files + 1):
            path = (data if day < args.files else spare) / f"d{day:04d}.parquet"
            con.execute(DAY_SQL.format(day=day, rows=per_file, path=path))
        (work / "report.yaml").write_text(yaml.safe_dump(REPORT))
        times: dict[str, list[float]] = {}
        size_per_million = beyond_per_million = 0.0
        for _ in range(args.rounds):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            times.setdefault("cold, no cache", []).append(timed(work))
            times.setdefault("floor: cp of the module", []).append(copied(work / "out", False))
            times.setdefault("floor: cp, renamed over it", []).append(copied(work / "out", True))
            times.setdefault("floor: start-up", []).append(started_up())
            times.setdefault("cold, empty cache", []).append(timed(work, "--cache", str(cache)))
            size, shared = cache_sizes(cache, work / "out" / "daily.typ")
            size_per_million = size / args.rows * 1e6
            beyond_per_million = (size - shared) / args.rows * 1e6
            times.setdefault("nothing changed", []).append(timed(work, "--cache", str(cache)))
            added = data / f"d{args.files:04d}.parquet"
            shutil.copy(spare / added.name, added)
            before = entries(cache)
            times.setdefault("one day appended", []).append(timed(work, "--cache", str(cache)))
            added.unlink()
            for name in entries(cache) - before:
                (cache / "entries" / name).unlink()
            shutil.rmtree(cache)
            done = killed_at(work, cache, args.files, 0.7)
            times.setdefault(f"after a kill at ~70 % ({done} units)", []).append(
                timed(work, "--cache", str(cache))
            )
        cold = statistics.median(times["cold, no cache"])
        results = {
            case: {"wall_s": statistics.median(t), "x_cold": statistics.median(t) / cold}
            for case, t in times.items()
        }
        results["cache_bytes_per_million_rows"] = size_per_million
        results["cache_bytes_per_million_rows_beyond_the_module"] = beyond_per_million
        for case, r in results.items():
            if isinstance(r, dict):
                spread = ", ".join(f"{t:.2f}" for t in times[case])
                print(f"{case:38s} {r['wall_s']:8.2f} s  {r['x_cold']:5.2f}x  ({spread})")
        print(
            f"cache on disk: {size_per_million / 2**20:,.0f} MiB per million rows, "
            f"{beyond_per_million / 2**20:,.2f} MiB of them not the module's too"
        )
        if args.out:
            env = {
                "rows": args.rows,
                "files": args.files,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            }
            args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
