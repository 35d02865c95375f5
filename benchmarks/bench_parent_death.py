"""How long the processes of an ``ashstream run`` outlive a SIGKILLed parent.

Starts ``ashstream run`` on a long DuckDB query, waits until the stream's shared memory
exists, SIGKILLs the parent and times until every descendant it had (forkserver,
resource tracker, registry, transformers, producer) is gone and its segments are
unlinked. Prints a table (median and worst of ``--repeats``) and writes JSON.

    python benchmarks/bench_parent_death.py --repeats 5 --out parent_death.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SEGMENT_PREFIX = "ashstream_"
QUERY = "SELECT i, repeat('x', 200) AS s FROM range(100000000) t(i)"


def segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{pid}_")]


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those not exited yet. A zombie has exited: an orphan's zombie waits for an init
    that may never reap it (as in some containers)."""
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def one_run(directory: Path, workers: int, give_up_s: float) -> dict:
    report = directory / "long.yaml"
    report.write_text(f'name: long\nsource: {{duckdb: {{query: "{QUERY}"}}}}\n')
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ashstream",
            "run",
            str(report),
            "-o",
            str(directory / "o.typ"),
            "--no-progress",
            "--workers",
            str(workers),
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not segments_of(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    killed = time.monotonic()
    process.wait()
    alive = running(descendants)
    while alive and time.monotonic() - killed < give_up_s:
        time.sleep(0.002)
        alive = running(alive)
    gone_s = time.monotonic() - killed
    while segments_of(process.pid) and time.monotonic() - killed < give_up_s:
        time.sleep(0.01)
    left = segments_of(process.pid)
    for straggler in alive:  # an old version's leftovers: do not leave them running
        straggler.kill()
    for name in left:
        os.unlink(f"/dev/shm/{name}")
    return {
        "descendants": len(descendants),
        "all_gone_s": None if alive else gone_s,
        "alive_after_give_up": len(alive),
        "segments_left": len(left),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--give-up-s", type=float, default=10.0)
    parser.add_argument("--out", default="parent_death.json")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as directory:
            runs.append(one_run(Path(directory), args.workers, args.give_up_s))
    times = [r["all_gone_s"] for r in runs if r["all_gone_s"] is not None]
    summary = {
        "runs": runs,
        "median_all_gone_s": statistics.median(times) if times else None,
        "worst_all_gone_s": max(times) if times else None,
        "runs_with_survivors": sum(1 for r in runs if r["alive_after_give_up"]),
        "runs_with_segments_left": sum(1 for r in runs if r["segments_left"]),
    }
    print(f"{'run':>3}  {'descendants':>11}  {'all gone (s)':>12}  {'alive':>5}  {'segments':>8}")
    for i, r in enumerate(runs):
        gone = f"{r['all_gone_s']:.3f}" if r["all_gone_s"] is not None else f">{args.give_up_s:g}"
        print(
            f"{i:>3}  {r['descendants']:>11}  {gone:>12}  {r['alive_after_give_up']:>5}  "
            f"{r['segments_left']:>8}"
        )
    if times:
        print(
            f"median {summary['median_all_gone_s']:.3f} s, worst {summary['worst_all_gone_s']:.3f} s"
        )
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
