"""The health loop (memory breaker, stalls) and telemetry, with real processes and memory."""

from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest

from ashstream import PipelineError, StreamPool, load_report, telemetry
from tests.conftest import write_report
from tests.watch import HealthChecks, segments_of_this_run

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


@pytest.fixture
def events():
    """Every telemetry event emitted during the test, in order."""
    seen: list[tuple[str, dict, dict]] = []

    def record(event, measurements, metadata):
        seen.append((event, dict(measurements), dict(metadata)))

    telemetry.attach("*", record)
    yield seen
    telemetry.detach("*", record)


@pytest.fixture
def health_checks():
    """``wait(n)``: returns once ``n`` more health checks have run."""
    with HealthChecks() as checks:
        yield checks.wait


def test_attach_refuses_unknown_events_and_detach_reports_absence():
    with pytest.raises(ValueError, match=r"unknown telemetry event 'chunk\.finished'"):
        telemetry.attach("chunk.finished", print)
    assert telemetry.detach("batch.done", print) is False


def test_a_stream_emits_its_lifecycle_and_a_failing_handler_breaks_nothing(
    tmp_path, events, caplog
):
    def broken(event, measurements, metadata):
        raise RuntimeError("handler bug")

    telemetry.attach("batch.done", broken)
    report = write_report(
        tmp_path, 'name: t\nsource: {duckdb: {query: "SELECT * FROM range(40000) t(i)"}}\n'
    )
    try:
        with (
            caplog.at_level(logging.ERROR, logger="ashstream.telemetry"),
            StreamPool(2, health_interval_s=0.1) as pool,
        ):
            rows = sum(c.num_rows for c in pool.stream(report, chunk_size=5000))
    finally:
        telemetry.detach("batch.done", broken)
    assert rows == 40000
    names = [e[0] for e in events]
    of_the_stream = [e[0] for e in events if "stream_id" in e[2] and e[0] != "throughput"]
    assert of_the_stream[0] == "pipeline.started" and of_the_stream[-1] == "pipeline.stopped"
    assert set(of_the_stream[1:-1]) == {"batch.done"}
    assert "health.checked" in names
    done = [e for e in events if e[0] == "batch.done"]
    assert sum(m["rows"] for _, m, _ in done) == 40000
    stopped = [e for e in events if e[0] == "pipeline.stopped"]
    assert stopped[-1][1]["rows"] == 40000 and stopped[-1][2]["status"] == "completed"
    assert "handler bug" in caplog.text  # logged, and the stream went on


def test_memory_breaker_pauses_admission_and_the_run_still_completes(
    tmp_path, events, health_checks
):
    rows = 3_000_000
    query = f"SELECT * FROM range({rows}) t(i)"
    with StreamPool(2, health_interval_s=0.1) as pool:
        warm = write_report(
            tmp_path, {"name": "w", "source": {"duckdb": {"query": query}}}, "w.yaml"
        )
        for _ in pool.stream(warm, chunk_size=1000):
            pass  # every process is up and has done this work once
        health_checks(2)  # one that began after the stream ended
        baseline = pool.memory_bytes
        limit = baseline + 400 * 2**20
        report = write_report(
            tmp_path,
            {
                "name": "m",
                "source": {"duckdb": {"query": query}},
                "pipeline": {"memory_limit": limit},
            },
        )
        ballast: list[np.ndarray] = []
        statuses: set[str] = set()

        def on_event(event, measurements, metadata):
            if event == "backpressure.on":
                ballast.clear()  # the memory goes away while admission is paused
            if event == "health.checked":
                statuses.update(e["status"] for e in pool.list())

        telemetry.attach("*", on_event)
        try:
            parts = []
            for i, chunk in enumerate(pool.stream(load_report(report), chunk_size=1000)):
                parts.append(chunk.text)
                if i == 0:  # the tree now needs more than its limit
                    # In the list before its pages are touched, so the handler can drop it
                    # even while it is being filled.
                    block = np.empty(limit - baseline, np.uint8)
                    ballast.append(block)
                    block.fill(1)
                    del block
        finally:
            telemetry.detach("*", on_event)
    names = [e[0] for e in events]
    for name in ("memory.warning", "memory.critical", "backpressure.on", "backpressure.off"):
        assert name in names
    assert names.index("backpressure.on") < names.index("backpressure.off")
    assert "paused" in statuses
    assert b"".join(parts) == "".join(f'("i": {i}),\n' for i in range(rows)).encode()


def test_memory_that_stays_critical_fails_the_stream_with_advice(tmp_path):
    """End to end; when the breaker pauses and gives up is table-tested in
    test_scheduling.py."""
    spec = {"name": "low", "source": {"duckdb": {"query": "SELECT * FROM range(100000000) t(i)"}}}
    report = write_report(tmp_path, spec)
    from ashstream import ResourceError

    # a limit below what the processes need at rest: critical from the first check on
    with StreamPool(1, health_interval_s=0.1, memory_limit="16MiB", pause_timeout_s=0.5) as pool:
        handle = pool.start(report, chunk_size=1000)
        with pytest.raises(
            ResourceError, match=r"over 95% of the 16 MiB limit, for 0.5 s .* Raise memory_limit"
        ):
            list(handle)
    assert segments_of_this_run() == []


def test_a_report_limit_below_the_idle_pool_fails_at_once(tmp_path):
    spec = {
        "name": "low",
        "source": {"duckdb": {"query": "SELECT * FROM range(100000000) t(i)"}},
        "pipeline": {"memory_limit": "16MiB"},  # below what the processes need at rest
    }
    report = write_report(tmp_path, spec)
    from ashstream import ResourceError

    with StreamPool(1) as pool:
        with pytest.raises(ResourceError, match=r"memory_limit: 16 MiB is less than this pool"):
            pool.start(report)
        assert pool.list() == []  # nothing was opened
    assert segments_of_this_run() == []


def test_a_stalled_stream_fails_instead_of_hanging(tmp_path):
    report = write_report(
        tmp_path, 'name: s\nsource: {duckdb: {query: "SELECT * FROM range(100000000) t(i)"}}\n'
    )
    with StreamPool(1, health_interval_s=0.1, stall_timeout_s=1.5) as pool:
        handle = pool.start(report, chunk_size=1000)
        stream = iter(handle)
        next(stream)
        producer = pool.status(handle.id)["pids"]["producer"]
        os.kill(producer, signal.SIGSTOP)  # alive but stuck, as a hung source would be
        try:
            with pytest.raises(PipelineError, match=r"made no progress for 1.5 s"):
                for _ in stream:
                    pass
        finally:
            try:
                os.kill(producer, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert segments_of_this_run() == []


def test_health_checks_keep_running_while_the_caller_is_busy(tmp_path, health_checks):
    report = write_report(
        tmp_path, 'name: b\nsource: {duckdb: {query: "SELECT * FROM range(100000) t(i)"}}\n'
    )
    with StreamPool(1, health_interval_s=0.05) as pool:
        stream = pool.stream(report, chunk_size=1000)
        next(stream)
        health_checks(3)  # while the caller takes nothing: checks go on, the stream waits
        assert pool.status(next(iter(pool.list()))["id"])["status"] == "running"
        stream.close()
