"""Where the CPU of a whole ``ashstream run`` goes, process by process, beside DuckDB's.

On two cores a run is bound by CPU: this says whose. Each case runs as a process of its
own on the sales Parquet file; every process of its tree is sampled with psutil every
20 ms, and the last CPU time (user + system) seen of each is kept, by role (the title
ashstream gives its children: parent, fork server, producer, transformer N, registry).
The sampler costs a little CPU of its own, so compare the walls with --whole's.

    python benchmarks/bench_cpu.py [--rows 2000000] [--repeats 3]

Cases alternate round by round; medians. Prints a table; writes
benchmarks/results/bench_cpu.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import compile_ashstream, print_table, write_results
from bench_pipeline import sales_files

SAMPLE_S = 0.02


def role_of(process: psutil.Process, root_pid: int) -> str:
    """``transformer 0``, ``producer 0``... from the child's title; ``parent`` for the
    command itself; ``other`` for the rest (the fork server, the resource tracker)."""
    if process.pid == root_pid:
        return "parent"
    title = " ".join(process.cmdline())
    if title.startswith("ashstream: "):
        return title.removeprefix("ashstream: ").split(" [")[0]
    return "fork server" if "forkserver" in title else "other"


def run_sampled(command: list[str], cwd: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of ``command`` and the CPU seconds of its tree, by role."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd)
    root = psutil.Process(process.pid)
    last: dict[int, tuple[str, float]] = {}
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            try:
                times = member.cpu_times()
                # read each time: a child has the fork server's title until it names itself
                last[member.pid] = (role_of(member, root.pid), times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    by_role: dict[str, float] = defaultdict(float)
    for role, cpu in last.values():
        by_role[role] += cpu
    return wall, dict(by_role)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    compile_ashstream()
    here = Path(__file__).resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    parquet, report = sales_files(workdir, args.rows)
    run = [sys.executable, "-m", "ashstream", "run", str(report), "-q", "-o"]
    commands = {
        "ashstream, a pool of 2": [*run, str(workdir / "a.typ"), "--workers", "2"],
        "ashstream, a pool of 1": [*run, str(workdir / "b.typ"), "--workers", "1"],
        "ashstream, in process": [*run, str(workdir / "c.typ"), "--inline-rows", str(args.rows)],
        "DuckDB SQL, 2 threads": [
            sys.executable,
            str(here / "_duckdb_peer.py"),
            str(parquet),
            str(workdir / "d.txt"),
            "2",
        ],
    }
    samples: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in commands}
    try:
        for _ in range(args.repeats):
            for name, command in commands.items():
                samples[name].append(run_sampled(command, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {}
    rows = []
    for name, runs in samples.items():
        roles = sorted({role for _, by_role in runs for role in by_role})
        cpu = {role: statistics.median(r.get(role, 0.0) for _, r in runs) for role in roles}
        wall = statistics.median(w for w, _ in runs)
        total = statistics.median(sum(r.values()) for _, r in runs)
        results[name] = {"wall_s": wall, "cpu_s": cpu, "total_cpu_s": total}
        rows.append([name, "(wall)", f"{wall:.2f}"])
        rows += [["", role, f"{seconds:.2f}"] for role, seconds in cpu.items()]
        rows.append(["", "(all CPU)", f"{total:.2f}"])
    print(f"{args.rows:,} rows, medians of {args.repeats}; CPU seconds by process")
    print_table(["case", "process", "s"], rows)
    path = write_results("bench_cpu", {"rows": args.rows, "cases": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
