"""PNG plots of the benchmarks' JSON results (needs the ``bench`` extra).

    python benchmarks/plot.py

Writes benchmarks/results/throughput.png (rows/s by workers or threads, against the
peers) and memory.png (peak memory of the process tree by rows), from
bench_pipeline.json; and whole.png (a whole ``ashstream run`` against a DuckDB process,
by rows), from bench_small.json and bench_whole.json when they are there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
SERIES = {  # label -> {parallelism: case name}
    "ashstream": {1: "ashstream, 1 worker", 2: "ashstream, 2 workers"},
    "DuckDB SQL": {1: "DuckDB SQL, 1 thread", 2: "DuckDB SQL, 2 threads"},
    "multiprocessing.Pool, bytes": {2: "multiprocessing.Pool(2), bytes"},
    "multiprocessing.Pool, str rows": {2: "multiprocessing.Pool(2), str rows"},
    "encoder alone": {1: "encoder alone, 1 process"},
}


def main() -> None:
    results = json.loads((RESULTS / "bench_pipeline.json").read_text())
    sizes = results["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, (rows, entry) in zip(axes[0], sizes.items(), strict=True):
        for label, points in SERIES.items():
            xs = [n for n, case in points.items() if case in entry["cases"]]
            ys = [entry["cases"][points[n]]["rows_per_s"] / 1e6 for n in xs]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(f"{int(rows):,} rows from Parquet")
        ax.set_xlabel("workers / threads / processes")
        ax.set_ylabel("million rows/s")
        ax.set_xticks([1, 2])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=110)

    row_counts = [int(r) for r in sizes]
    peaks = {
        case: [sizes[str(r)]["cases"][case]["peak_pss_bytes"] / 2**20 for r in row_counts]
        for case in next(iter(sizes.values()))["cases"]
    }
    plot_by_rows(row_counts, peaks, "rows", "peak memory of the process tree (PSS, MiB)")
    plt.gcf().savefig(RESULTS / "memory.png", dpi=110)
    print(f"wrote {RESULTS / 'throughput.png'} and {RESULTS / 'memory.png'}", file=sys.stderr)
    plot_whole_processes()


def plot_by_rows(rows: list[int], lines: dict[str, list[float]], xlabel: str, ylabel: str) -> None:
    """One line per case against the row count (log scale), on a new figure."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in lines.items():
        ax.plot(rows, values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()


def plot_whole_processes() -> None:
    """Each case's speed over DuckDB's ``COPY … TO json``, by rows: above 1, ahead."""
    sizes: dict[int, dict] = {}
    for name in ("bench_small.json", "bench_whole.json"):
        if (RESULTS / name).exists():
            for rows, cases in json.loads((RESULTS / name).read_text())["sizes"].items():
                sizes[int(rows)] = cases
    if not sizes:
        return
    rows = sorted(sizes)
    ratios = {
        case: [sizes[r][case]["x_duckdb_json_speed"] for r in rows]
        for case in next(iter(sizes.values()))
    }
    plot_by_rows(
        rows, ratios, "rows (whole processes, start-up included)", "speed / DuckDB's JSON export"
    )
    plt.gcf().savefig(RESULTS / "whole.png", dpi=110)
    print(f"wrote {RESULTS / 'whole.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
