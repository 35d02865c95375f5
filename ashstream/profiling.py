"""memray sessions: a Tracker inside every process of a run, and a summary of the captures.

``memray run --follow-fork`` cannot follow forkserver or spawn children, so each process
starts its own ``memray.Tracker`` (aggregated format: small files for long runs) and
closes it before it exits. A process killed with SIGKILL loses its capture. Arrow's own
allocator is invisible to memray's hooks, so a profiled run switches Arrow to the system
allocator (``ARROW_DEFAULT_MEMORY_POOL=system`` for the children, ``set_memory_pool``
here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa


@contextmanager
def tracked(directory: str | None, role: str, generation: int = 0) -> Iterator[None]:
    """Record this process's allocations to ``<directory>/<role>-<pid>-<generation>.bin``."""
    if directory is None:
        yield
        return
    import memray

    path = Path(directory) / f"{role}-{os.getpid()}-{generation}.bin"
    with memray.Tracker(path, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        yield


def prepare(directory: str) -> None:
    """Before a profiled pool starts: the folder exists, Arrow uses the system allocator."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"  # read by children at import
    pa.set_memory_pool(pa.system_memory_pool())


def captures(directory: str) -> list[dict[str, Any]]:
    """One entry per capture file: role, pid, peak memory and allocation count."""
    import memray

    entries = []
    for path in sorted(Path(directory).glob("*.bin")):
        reader = memray.FileReader(path)
        try:
            meta = reader.metadata
            entries.append(
                {
                    "file": str(path),
                    "role": path.stem.rsplit("-", 2)[0],
                    "pid": meta.pid,
                    "peak_memory_bytes": meta.peak_memory,
                    "allocations": meta.total_allocations,
                }
            )
        finally:
            reader.close()
    return entries


def flamegraph(capture: str) -> str:
    """Write ``<capture>.html`` with memray's flamegraph reporter; returns its path."""
    output = str(Path(capture).with_suffix(".html"))
    subprocess.run(
        [sys.executable, "-m", "memray", "flamegraph", "-f", "-o", output, capture],
        check=True,
        capture_output=True,
    )
    return output
