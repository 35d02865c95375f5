"""Deaths of multiprocessing's own helper processes, with real processes and real signals:
the fork server and the resource tracker may be killed (the OOM killer, an operator
killing a python process without an ``ashstream:`` title) while the pool runs."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from ashstream import StreamPool
from ashstream.engines.local.shm import our_segments
from tests.conftest import write_report

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

ROWS = 200_000


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sql = f"SELECT i, repeat('x', i % 50) AS s FROM range({ROWS}) t(i)"
    directory = tmp_path_factory.mktemp("faults")
    return write_report(directory, {"name": "f", "source": {"duckdb": {"query": sql}}})


def helper(module: str) -> psutil.Process:
    """This process's helper running ``multiprocessing.<module>``, by its command line."""
    (found,) = [
        p
        for p in psutil.Process().children()
        if f"from multiprocessing.{module} import main" in " ".join(p.cmdline())
    ]
    return found


def kill(process: psutil.Process) -> None:
    """SIGKILL one of this process's helpers and wait until it has died (a zombie:
    multiprocessing reaps it when it next looks)."""
    process.kill()
    deadline = time.monotonic() + 30
    while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.status() == psutil.STATUS_ZOMBIE


def stream_killing(pool: StreamPool, report, victims: dict[int, object]) -> bytes:
    """The text of a stream during which, after chunk ``i``, ``victims[i]()`` runs."""
    parts = []
    for i, chunk in enumerate(pool.stream(report, chunk_size=1000)):
        parts.append(chunk.text)
        if i in victims:
            victims[i]()
    return b"".join(parts)


def test_the_fork_server_killed_mid_run_changes_nothing(report):
    """Every child lives on, so the run completes byte for byte; a transformer that
    dies later is replaced by a new fork server's child."""
    with StreamPool(2) as pool:
        alone = stream_killing(pool, report, {})
        victims = {
            2: lambda: kill(helper("forkserver")),
            60: lambda: os.kill(pool.transformer_pids()[0], 9),
        }
        assert stream_killing(pool, report, victims) == alone
        assert pool.restarts == 1  # the transformer only
        pids = pool.transformer_pids()
        assert stream_killing(pool, report, {}) == alone
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert our_segments() == []


def test_the_resource_tracker_killed_mid_run_leaves_no_segment(report, capfd):
    """The segments made before its death are unlinked by the pool all the same, and
    the next ones are registered with a new tracker; nobody warns of leaks."""
    with StreamPool(2) as pool:
        alone = stream_killing(pool, report, {})
        again = []

        def kill_the_tracker_and_start_another() -> None:
            kill(helper("resource_tracker"))
            again.append(stream_killing(pool, report, {}))

        assert stream_killing(pool, report, {2: kill_the_tracker_and_start_another}) == alone
        assert again == [alone]
    assert our_segments() == []
    helper("resource_tracker")  # the new one
    stderr = capfd.readouterr().err
    assert "KeyError" not in stderr and "leak" not in stderr, stderr
