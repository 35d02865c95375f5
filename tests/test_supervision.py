"""Supervision with real processes and real signals: nothing is lost when children die."""

from __future__ import annotations

import os
import random
import signal
import threading

import pyarrow as pa
import pytest

from ashstream import PipelineError, StreamPool, WorkerCrashed, encode_rows
from ashstream.engines.local.child import CRASH_AT_ROW_ENV
from tests.conftest import mixed_sql, mixed_table, write_report
from tests.watch import HealthChecks, segments_of_this_run

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

ROWS = 60_000


def text_of(table: pa.Table) -> bytes:
    return "".join(row + ",\n" for row in encode_rows(table).to_pylist()).encode()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    report = write_report(
        directory, {"name": "mixed", "source": {"duckdb": {"query": mixed_sql(ROWS)}}}
    )
    return report, mixed_table(ROWS)


@pytest.fixture(scope="module")
def tolerant_pool():
    """Two transformers and room for every kill of the fault-injection runs."""
    with StreamPool(2, max_restarts=1000) as pool:
        yield pool


@pytest.mark.parametrize("chunk_size", [100, 1000, 7000])
def test_a_transformer_killed_at_a_random_row_loses_nothing(monkeypatch, mixed, chunk_size):
    """The transformers of each slot's first start SIGKILL themselves on the batch that
    holds a random row: that batch is dispatched again, to a replacement, and the text
    comes out whole."""
    report, table = mixed
    row = random.Random(chunk_size).randrange(ROWS)  # what a death means: test_scheduling
    monkeypatch.setenv(CRASH_AT_ROW_ENV, f"{row}:1")
    with StreamPool(2, max_restarts=1000) as pool:
        handle = pool.start(report, chunk_size=chunk_size)
        assert b"".join(c.text for c in handle) == text_of(table)
        entry = pool.status(handle.id)
        assert entry["status"] == "completed"
        assert entry["redispatched"] >= 1
        assert 1 <= pool.restarts <= 2  # the other first-start transformer may take it too


def test_chunks_held_by_killed_transformers_are_dispatched_again(tolerant_pool, mixed):
    report, table = mixed
    handle = tolerant_pool.start(report, chunk_size=1000)
    parts = []
    for i, chunk in enumerate(handle):
        parts.append(chunk.text)
        if i == 0:  # the next batches are in flight now: kill every transformer
            for pid in tolerant_pool.transformer_pids():
                os.kill(pid, signal.SIGKILL)
    assert b"".join(parts) == text_of(table)
    entry = tolerant_pool.status(handle.id)
    assert entry["restarts"] >= 2
    assert entry["redispatched"] >= 1


def test_a_failure_once_every_batch_is_taken_does_not_fail_the_stream(tolerant_pool, mixed):
    """The caller finishes the merge outside the dispatcher's lock (a cached run merges
    its last unit there); a failure raised meanwhile (the memory breaker, a child's
    death) finds every row taken: the stream completes, its summary is there."""
    report, table = mixed
    handle = tolerant_pool.start(report, chunk_size=1000)
    merge = handle._state.merge
    finish = merge.finish
    raised = []

    def fail_then_finish() -> None:
        failing = threading.Thread(
            target=tolerant_pool._supervisor.fail, args=(handle._state, PipelineError("late"))
        )
        failing.start()
        failing.join(10)
        raised.append(not failing.is_alive())  # the lock was free
        finish()

    merge.finish = fail_then_finish
    assert b"".join(c.text for c in handle) == text_of(table)
    assert raised == [True]
    assert tolerant_pool.status(handle.id)["status"] == "completed"
    assert handle.summary.totals == {}


@pytest.fixture
def crash_at_row(monkeypatch):
    """Transformers started after this SIGKILL themselves on any batch holding row
    20 000 (the pool reads the variable when it starts each child)."""
    monkeypatch.setenv(CRASH_AT_ROW_ENV, "20000")
    return 20_000


def test_a_chunk_that_kills_three_transformers_fails_its_stream_naming_the_rows(
    mixed, crash_at_row
):
    report, _ = mixed
    with StreamPool(2, start_method="spawn") as pool:
        handle = pool.start(report, chunk_size=1000)
        with pytest.raises(
            WorkerCrashed, match=r"rows (\d+)\.\.(\d+) \(batch \d+\) killed 3 transformer"
        ) as err:
            for _ in handle:
                pass
        first, last = (
            int(x) for x in err.value.args[0].split("rows ")[1].split(" ")[0].split("..")
        )
        assert first <= crash_at_row <= last
        assert pool.status(handle.id)["status"] == "failed"


def test_skip_policy_leaves_the_poison_rows_out_and_reports_them(mixed, crash_at_row):
    report, table = mixed
    with StreamPool(2, start_method="spawn", poison_policy="skip") as pool:
        handle = pool.start(report, chunk_size=1000)
        text = b"".join(c.text for c in handle)
        assert len(handle.skipped) == 1
        first, last = handle.skipped[0]
        assert first <= crash_at_row <= last
        kept = pa.concat_tables([table.slice(0, first), table.slice(last + 1)])
        assert text == text_of(kept)
        assert pool.status(handle.id)["skipped"] == [(first, last)]


def test_too_many_restarts_and_the_pool_gives_up(mixed, crash_at_row):
    report, _ = mixed
    with StreamPool(2, start_method="spawn", max_restarts=2) as pool:
        with pytest.raises(WorkerCrashed, match=r"died 3 times within 60 s .* the pool gives up"):
            list(pool.stream(report, chunk_size=1000))
        with pytest.raises(PipelineError, match="the pool can run no more streams"):
            pool.start(report)


@pytest.mark.parametrize(
    "signum, hint",
    [
        (signal.SIGKILL, "if the system was out of memory"),
        # what a write to a full /dev/shm does: said as such, not blamed on memory
        (signal.SIGBUS, "a write to shared memory failed: /dev/shm has"),
    ],
)
def test_a_killed_producer_fails_the_stream_cleanly_and_says_why(
    tolerant_pool, tmp_path, signum, hint
):
    report = write_report(
        tmp_path, 'name: p\nsource: {duckdb: {query: "SELECT * FROM range(100000000) t(i)"}}\n'
    )
    handle = tolerant_pool.start(report, chunk_size=1000)
    stream = iter(handle)
    next(stream)
    os.kill(tolerant_pool.status(handle.id)["pids"]["producer"], signum)
    name = signal.Signals(signum).name
    with pytest.raises(WorkerCrashed) as failure:
        for _ in stream:
            pass
    assert f"died (killed by {name})" in str(failure.value)
    assert hint in str(failure.value)
    assert ("out of memory" in str(failure.value)) == (signum == signal.SIGKILL)
    assert tolerant_pool.status(handle.id)["status"] == "failed"
    assert segments_of_this_run() == []


def test_twenty_concurrent_streams_on_one_pool(tmp_path):
    reports = [
        write_report(
            tmp_path,
            {"name": f"s{i}", "source": {"duckdb": {"query": mixed_sql(1000 + 97 * i)}}},
            f"s{i}.yaml",
        )
        for i in range(20)
    ]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []
    with StreamPool(2, health_interval_s=0.05) as pool, HealthChecks() as checks:

        def consume(i: int) -> None:
            try:
                results[i] = b"".join(c.text for c in pool.stream(reports[i], chunk_size=250))
            except BaseException as exc:  # reported below
                errors.append(exc)

        consume(19)  # one stream alone first: every process warm, its peak measured
        checks.wait(2)
        checks.reset_peak()
        consume(19)
        checks.wait(2)  # a check that began after the stream ended
        one_stream = checks.peak_memory_bytes
        checks.reset_peak()
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        checks.wait(2)
        twenty = checks.peak_memory_bytes
    assert not errors
    assert twenty < 3 * one_stream, (twenty >> 20, one_stream >> 20)
    for i in range(20):
        assert results[i] == text_of(mixed_table(1000 + 97 * i))
