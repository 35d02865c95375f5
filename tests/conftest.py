"""Shared fixtures: leak checks around every test, pools, and small generated sources."""

from __future__ import annotations

import logging
import multiprocessing
import textwrap
from pathlib import Path

import duckdb
import pytest
import yaml

from ashstream import StreamPool
from tests.watch import segments_of_this_run

# One mixed table for the pipeline tests: escapes, nulls, dates, decimals, nested values.
MIXED_SQL = """
SELECT
    i AS id,
    CASE WHEN i % 7 = 0 THEN NULL ELSE 'row "' || i || '"' || chr(10) || '\\tab' END AS name,
    ['a', 'b', 'c'][1 + (i % 3)::INT] AS letter,
    (i * 1.25)::DECIMAL(10, 2) AS amount,
    i / 3.0 AS ratio,
    DATE '2024-01-01' + (i % 400)::INT AS day,
    TIMESTAMP '1969-12-31 23:59:00' + to_microseconds(i * 1234567) AS at,
    i % 2 = 0 AS even,
    CASE WHEN i % 5 = 0 THEN NULL ELSE [i, i + 1] END AS pair,
    {'k': i % 4, 's': 'x' || i} AS info
FROM range({rows}) t(i)
"""


@pytest.fixture(autouse=True)
def no_segment_leaks():
    """Every test leaves /dev/shm as it found it."""
    before = set(segments_of_this_run())
    yield
    leaked = set(segments_of_this_run()) - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def restore_ashstream_logging():
    """`ashstream run` configures the ashstream logger for its process; in-process CLI
    tests must not leave that configuration to the tests after them."""
    logger = logging.getLogger("ashstream")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])  # setLevel, unlike assigning .level, clears the level cache
    logger.propagate = saved[2]


@pytest.fixture(scope="session", autouse=True)
def no_process_leaks():
    yield
    left = [p for p in multiprocessing.active_children() if p.name.startswith("ashstream")]
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def pools():
    """Pools by worker count, started on first use and shared by the session."""
    started: dict[int, StreamPool] = {}

    def get(workers: int) -> StreamPool:
        if workers not in started:
            started[workers] = StreamPool(workers)
            started[workers].open()
        return started[workers]

    yield get
    for pool in started.values():
        pool.close()


def assert_one_line(stderr: str, *parts: str) -> None:
    """What the user reads of a failure: one line, with these parts, and no trace."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr


def write_report(directory: Path, text: str | dict, name: str = "report.yaml") -> Path:
    """Write a report definition (YAML text, or a mapping dumped as YAML)."""
    path = directory / name
    path.write_text(textwrap.dedent(text) if isinstance(text, str) else yaml.safe_dump(text))
    return path


def mixed_sql(rows: int) -> str:
    return MIXED_SQL.replace("{rows}", str(rows))


def mixed_table(rows: int):
    return duckdb.connect().sql(mixed_sql(rows)).to_arrow_table()
