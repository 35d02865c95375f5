"""This checkout against another checkout of ashstream: whole ``ashstream run`` processes.

Did a change cost throughput? Both versions run the same report (a Parquet file of the
sales schema) in whole processes, start included, alternating round by round so that
the machine's drift hits both alike; the median of ``--repeats`` is reported with the
ratio, and the two modules must be byte-identical.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_versions.py --other /tmp/before --rows 2000000 --repeats 5

At or below ``--inline-rows`` (500,000 on 2 cores) this checkout runs the report in the
calling process, while a checkout from before that option starts a pool.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import print_table, write_results
from _sales import SALES_SQL

HERE = Path(__file__).resolve().parent.parent


def run_version(tree: Path, report: Path, out: Path, workers: int) -> float:
    command = [sys.executable, "-m", "ashstream", "run", str(report), "-o", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([*command, "--workers", str(workers)], check=True, env=env, cwd=tree)
    return time.perf_counter() - started


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="another ashstream checkout")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    trees = {"this checkout": HERE, "other": Path(args.other).resolve()}
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        parquet = work / "sales.parquet"
        duckdb.connect().sql(SALES_SQL.format(rows=args.rows)).write_parquet(str(parquet))
        report = work / "sales.yaml"
        report.write_text(f"name: sales\nsource: {{parquet: {str(parquet)!r}}}\n")
        times: dict[str, list[float]] = {name: [] for name in trees}
        digests = {}
        for round_ in range(args.repeats + 1):  # round 0 warms the caches, discarded
            for name, tree in trees.items():
                out = work / f"{name.replace(' ', '_')}.typ"
                seconds = run_version(tree, report, out, args.workers)
                if round_:
                    times[name].append(seconds)
                digests[name] = sha256(out)
    assert len(set(digests.values())) == 1, f"the modules differ: {digests}"
    base = statistics.median(times["other"])
    results = {
        name: {
            "wall_s": statistics.median(runs),
            "runs_s": runs,
            "rows_per_s": args.rows / statistics.median(runs),
            "x_other": base / statistics.median(runs),
        }
        for name, runs in times.items()
    }
    print_table(
        ["version", "median wall s", "rows/s", "x other"],
        [
            [name, f"{r['wall_s']:.2f}", f"{r['rows_per_s']:,.0f}", f"{r['x_other']:.3f}"]
            for name, r in results.items()
        ],
    )
    cases = {"rows": args.rows, "workers": args.workers, "cases": results}
    write_results(f"bench_versions_{args.rows}", cases)


if __name__ == "__main__":
    main()
