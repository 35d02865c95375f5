"""Off the happy path, with real processes: whatever dies, whatever the data, a run ends
with one clear line and an exit code, and leaves no process and no segment behind."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pytest

from ashstream import PipelineError, StreamPool, WorkerCrashed, encode_rows, load_report
from ashstream.engines.local.child import CRASH_AT_START_ENV, FAIL_AT_ROW_ENV
from ashstream.engines.local.registry import running_pools
from ashstream.engines.local.shm import SEGMENT_PREFIX, our_segments
from ashstream.sources import SPILL_PREFIX
from tests.conftest import assert_one_line, mixed_sql, mixed_table, write_report

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def ashstream_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ashstream", *args]


def text_of(table: pa.Table) -> bytes:
    return "".join(row + ",\n" for row in encode_rows(table).to_pylist()).encode()


def module_rows(path: Path) -> bytes:
    """The text of ``rows`` in a written data module."""
    data = path.read_bytes()
    start = data.index(b"#let rows = (\n") + len(b"#let rows = (\n")
    return data[start : data.index(b")\n#let groups = (")]


def pool_processes(pool_pid: int) -> list[psutil.Process]:
    """Every live process whose title says it belongs to that pool."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or []).strip()  # padded by setproctitle
        if cmdline.startswith("ashstream:") and f"[pool {pool_pid}]" in cmdline:
            found.append(process)
    return found


def segments_of(pid: int) -> list[str]:
    return [n for n in our_segments() if n.startswith(f"{SEGMENT_PREFIX}{pid}_")]


def run_to_the_end(argv: list[str], **env: str) -> tuple[int, str, int]:
    """Run a command to its end: exit code, stderr, and its pid (to look for leftovers)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    stderr = process.communicate(timeout=100)[1]
    return process.returncode, stderr, process.pid


def assert_nothing_left_of(pool_pid: int) -> None:
    deadline = time.monotonic() + 5  # children exit at once; give a loaded machine slack
    while pool_processes(pool_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool_processes(pool_pid) == []
    assert segments_of(pool_pid) == []


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lifecycle")
    report = write_report(
        directory, {"name": "mixed", "source": {"duckdb": {"query": mixed_sql(30_000)}}}
    )
    return report, mixed_table(30_000)


# ------------------------------------------------------------------ start-up deaths


@pytest.mark.parametrize(("role", "slots"), [("transformer", 2), ("producer", 1)])
def test_a_child_that_dies_while_the_pool_starts_is_replaced(monkeypatch, mixed, role, slots):
    report, table = mixed
    monkeypatch.setenv(CRASH_AT_START_ENV, f"{role}:1")  # each slot's first start; forkserver
    with StreamPool(2) as pool:
        assert pool.restarts == slots
        assert b"".join(c.text for c in pool.stream(report, chunk_size=1000)) == text_of(table)
        pids = pool.transformer_pids()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert pool_processes(os.getpid()) == []


@pytest.mark.parametrize("role", ["transformer", "producer"])
def test_a_child_that_always_dies_while_starting_fails_the_run_with_one_line(tmp_path, mixed, role):
    report, _ = mixed
    out = tmp_path / "out"
    code, stderr, pid = run_to_the_end(
        ashstream_command("run", str(report), "-o", str(out / "m.typ"), "--no-progress"),
        **{CRASH_AT_START_ENV: role},
    )
    assert code == 1
    assert_one_line(
        stderr,
        f"Error: the {role} process ",  # which slot's death spends the budget varies
        "died while the pool was starting (killed by SIGKILL)",
        "ashstream cannot start",
    )
    assert not out.exists() or list(out.iterdir()) == []
    assert_nothing_left_of(pid)


def test_start_failure_in_the_api_raises_worker_crashed_and_leaves_nothing(monkeypatch):
    monkeypatch.setenv(CRASH_AT_START_ENV, "producer")
    pool = StreamPool(1, max_restarts=2)
    with pytest.raises(WorkerCrashed, match=r"the producer process 0 died while the pool"):
        pool.open()
    assert_nothing_left_of(os.getpid())


def test_a_pool_start_removes_what_dead_processes_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    spill = Path(tempfile.gettempdir()) / f"{SPILL_PREFIX}{dead.pid}-abc123"
    spill.mkdir()
    (spill / "sort.tmp").write_bytes(b"spilled by a producer that was killed")
    mine = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
    try:
        with StreamPool(1):
            assert not spill.exists()
            assert mine.exists()  # a live process's
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


# ------------------------------------------------------------- rows bigger than a slot


def test_rows_far_bigger_than_a_slot_flow_through_the_cli_with_default_settings(tmp_path):
    query = "SELECT i, repeat('x', 20000000) AS s FROM range(4) t(i)"  # 4 x 20 MB
    report = write_report(tmp_path, {"name": "huge", "source": {"duckdb": {"query": query}}})
    result = subprocess.run(
        ashstream_command("run", str(report), "-o", str(tmp_path / "huge.typ"), "-q"),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    table = duckdb.connect().sql(query).to_arrow_table()
    assert module_rows(tmp_path / "huge.typ") == text_of(table)


@pytest.mark.parametrize("workers", [1, 3])
def test_many_rows_bigger_than_a_slot_keep_their_order(tmp_path, workers):
    query = "SELECT i, repeat(chr(97 + (i % 26)::INT), 100000) AS s FROM range(500) t(i)"
    report = write_report(tmp_path, {"name": "wide", "source": {"duckdb": {"query": query}}})
    with StreamPool(workers, slot_bytes=64 * 1024) as pool:
        chunks = list(pool.stream(report, chunk_size=7))
    assert [c.first_row for c in chunks] == sorted(c.first_row for c in chunks)
    table = duckdb.connect().sql(query).to_arrow_table()
    assert b"".join(c.text for c in chunks) == text_of(table)


# ----------------------------------------------------------------- the parent dies


LONG_QUERY = "SELECT i, repeat('x', 200) AS s FROM range(100000000) t(i)"


def start_long_run(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """An ``ashstream run`` that is streaming; its descendants once all are up."""
    report = write_report(tmp_path, {"name": "long", "source": {"duckdb": {"query": LONG_QUERY}}})
    process = subprocess.Popen(
        ashstream_command(
            "run", str(report), "-o", str(tmp_path / "o.typ"), "--no-progress", *extra
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    # forkserver, resource tracker, registry, 2 transformers, a producer
    while len(parent.children(recursive=True)) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    while not written_to(segments_of(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)  # a batch is in the stream's arena: it is running
    return process, parent.children(recursive=True)


def written_to(segments: list[str]) -> bool:
    """Whether any of ``segments`` holds data (tmpfs allocates pages on first write)."""
    for name in segments:
        try:
            if os.stat(f"/dev/shm/{name}").st_blocks:
                return True
        except FileNotFoundError:
            pass
    return False


def exited_by(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Those of ``processes`` still running at ``deadline``. A zombie has exited: an
    orphan's zombie waits for an init that may never reap it (as in some containers)."""
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def test_sigkill_of_the_parent_leaves_no_process_and_no_segment(tmp_path):
    process, descendants = start_long_run(tmp_path, "--workers", "2")
    assert len(descendants) >= 6
    assert segments_of(process.pid)
    process.kill()
    alive = exited_by(descendants, time.monotonic() + 30)  # a way out, not a benchmark
    stderr = process.communicate(timeout=10)[1]
    assert not alive, f"still alive after the parent's death: {alive}"
    assert segments_of(process.pid) == []
    assert "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert pool_processes(process.pid) == []


# ---------------------------------------------------------------- the registry dies


def test_the_registry_process_dying_changes_nothing_but_status(mixed, caplog):
    report, table = mixed
    with StreamPool(2) as pool:
        me = os.getpid()
        (manager,) = [p for p in pool_processes(me) if "registry" in " ".join(p.cmdline())]
        handle = pool.start(report, chunk_size=1000)
        parts = []
        with caplog.at_level(logging.WARNING, logger="ashstream"):
            for i, chunk in enumerate(handle):
                parts.append(chunk.text)
                if i == 0:
                    manager.kill()
                    assert exited_by([manager], time.monotonic() + 30) == []
            assert [p for p in running_pools() if p["pid"] == os.getpid()] == [
                {
                    "pid": os.getpid(),
                    "started_at": pytest.approx(time.time(), abs=120),
                    "engine": "local",
                    "registry": "unreachable",
                    "streams": [],
                }
            ]
            assert pool.status(handle.id)["status"] == "completed"
            again = b"".join(c.text for c in pool.stream(report, chunk_size=1000))
        warnings = [r for r in caplog.records if "registry process is gone" in r.getMessage()]
        assert len(warnings) == 1
    assert b"".join(parts) == text_of(table)
    assert again == text_of(table)


def test_a_registry_that_dies_while_starting_leaves_the_pool_working(monkeypatch, mixed, caplog):
    report, table = mixed
    monkeypatch.setenv(CRASH_AT_START_ENV, "registry")
    with caplog.at_level(logging.WARNING, logger="ashstream"), StreamPool(1) as pool:
        handle = pool.start(report, chunk_size=1000)
        assert b"".join(c.text for c in handle) == text_of(table)
        assert pool.status(handle.id)["status"] == "completed"
    assert any("registry process is gone" in r.getMessage() for r in caplog.records)
    assert_nothing_left_of(os.getpid())


# ------------------------------------------------------------- the dispatcher fails


def test_an_internal_error_in_the_parent_fails_every_stream_and_leaves_nothing(mixed):
    """A message that cannot be sent (here a report that cannot be pickled) is a bug of
    the parent's machinery: the pool breaks, every stream fails with an internal error,
    new ones are refused, and closing it leaves nothing."""
    report, _ = mixed
    unpicklable = dataclasses.replace(load_report(report), param_values={"x": threading.Lock()})
    with StreamPool(2) as pool:
        first = iter(pool.start(report, chunk_size=1000))
        next(first)
        second = iter(pool.start(unpicklable, chunk_size=1000))
        for handle in (first, second):
            with pytest.raises(PipelineError, match="ashstream internal error, please report: "):
                for _ in handle:
                    pass
        with pytest.raises(PipelineError, match="the pool can run no more streams"):
            pool.start(report)
        pids = pool.transformer_pids()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert segments_of(os.getpid()) == []


def test_a_pause_that_never_ends_is_a_stall(mixed):
    report, _ = mixed
    # below what the processes need at rest: the breaker pauses at once, and would give
    # up only after pause_timeout_s
    with (
        StreamPool(
            1, stall_timeout_s=1.0, health_interval_s=0.1, memory_limit="16MiB", pause_timeout_s=600
        ) as pool,
        pytest.raises(PipelineError, match="paused by the memory breaker"),
    ):
        list(pool.stream(report, chunk_size=1000))


# ------------------------------------------------------------------- one line only


def test_a_transformer_failure_is_one_line_and_its_trace_goes_to_the_debug_log(tmp_path):
    query = "SELECT i FROM range(100000) t(i)"
    report = write_report(tmp_path, {"name": "f", "source": {"duckdb": {"query": query}}})
    argv = ashstream_command("run", str(report), "-o", str(tmp_path / "f.typ"), "--no-progress")
    code, stderr, pid = run_to_the_end(argv, **{FAIL_AT_ROW_ENV: "40000"})
    assert code == 1
    assert_one_line(
        stderr,
        "Error: encoding failed on rows ",
        "RuntimeError: a failure injected by a test",
        "--log-level debug",
    )
    first, last = stderr.split("on rows ")[1].split(" ")[0].split("..")
    assert int(first) <= 40000 <= int(last)  # counted from the source's first row
    assert_nothing_left_of(pid)
    code, stderr, _ = run_to_the_end([*argv, "--log-level", "debug"], **{FAIL_AT_ROW_ENV: "40000"})
    assert code == 1
    assert "Traceback" in stderr and "a failure injected by a test" in stderr
    assert list(tmp_path.iterdir()) == [report]


def test_an_unexpected_exception_in_the_cli_is_an_internal_error(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ashstream import cli

    def broken(summary: dict) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(cli, "_print_summary", broken)
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": "SELECT 1 AS a"}}})
    argv = ["run", str(report), "-o", str(tmp_path / "s.typ"), "--no-progress"]
    result = CliRunner().invoke(cli.main, argv)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "Internal error: KeyError: 'injected'", "--log-level debug")


# ------------------------------------------------------------------ the main guard


def test_a_script_without_the_main_guard_gets_one_clear_error(tmp_path):
    report = write_report(tmp_path, {"name": "s", "source": {"duckdb": {"query": "SELECT 1 AS a"}}})
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from ashstream import StreamPool

            with StreamPool(2) as pool:
                print(len(list(pool.stream({str(report)!r}))))
            """
        )
    )
    code, stderr, pid = run_to_the_end([sys.executable, str(script)])
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith("ashstream.errors.PipelineError")
    assert 'if __name__ == "__main__":' in stderr and "line 4" in stderr
    assert "EOFError" not in stderr
    assert stderr.count("Traceback") == 1
    assert_nothing_left_of(pid)


# ------------------------------------------------------------------ process titles


def test_every_child_names_itself_and_status_shows_them(mixed):
    report, _ = mixed
    with StreamPool(2) as pool:
        handle = pool.start(report, chunk_size=1000)
        chunks = iter(handle)
        next(chunks)  # the stream runs while its iterator lives
        me = os.getpid()
        titles = sorted(" ".join(p.cmdline()).strip() for p in pool_processes(me))
        assert titles == [
            f"ashstream: producer 0 [pool {me}]",
            f"ashstream: registry [pool {me}]",
            f"ashstream: transformer 0 [pool {me}]",
            f"ashstream: transformer 1 [pool {me}]",
        ]
        status = subprocess.run(
            ashstream_command("status"), capture_output=True, text=True, timeout=60
        )
        assert f"transformer 1 [pool {me}]" in status.stdout
        handle.cancel()
