"""Shared helpers of the benchmark scripts: timing, environment, the table, the JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeats`` calls after one discarded warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def compile_ashstream() -> None:
    """Write ashstream's bytecode, as ``pip install .`` does. An editable install under
    PYTHONDONTWRITEBYTECODE (as on the development machines) would otherwise compile
    every module at every start: ~30 ms that no installed copy pays."""
    import compileall

    import ashstream

    compileall.compile_dir(Path(ashstream.__file__).parent, quiet=1)


def environment() -> dict:
    import duckdb
    import pyarrow

    return {
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "duckdb": duckdb.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "argv": sys.argv[1:],
    }


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_results(name: str, results: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2) + "\n")
    return path
