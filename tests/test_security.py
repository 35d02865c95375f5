"""Hostile input and other local users (issue 21): a planted status directory or
socket, and reports that try to do more than read their sources.

Where a second user matters, the attacker's side runs as ``nobody`` (``setpriv``), as
CI runs as root; elsewhere those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import assert_one_line

NOBODY = 65534


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ashstream", *args]


def _nobody_can_run_python() -> str | None:
    """Why a test cannot run code as another user here, or None when it can."""
    if os.getuid() != 0:
        return "needs root to run code as another user (setpriv)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to run code as another user"
    probe = subprocess.run(as_nobody(sys.executable, "-c", "pass"), capture_output=True)
    if probe.returncode:
        return f"user nobody cannot run {sys.executable} here"
    return None


def as_nobody(*args: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]


needs_second_user = pytest.mark.skipif(
    (reason := _nobody_can_run_python()) is not None, reason=reason or ""
)


@pytest.fixture
def shared_dir():
    """A folder every user may write to, sticky like /tmp: where an attacker plants."""
    path = Path(tempfile.mkdtemp(prefix="ashstream-shared-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- status


def _status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command("status", *args), env=env, capture_output=True, text=True, timeout=60
    )


@needs_second_user
@pytest.mark.parametrize("plant", ["symlink", "foreign directory"])
def test_status_refuses_a_planted_directory_and_touches_nothing_in_it(tmp_path, shared_dir, plant):
    victim = tmp_path / "victim"  # one of our 0700 folders, holding a .json file
    victim.mkdir(mode=0o700)
    (victim / "precious.json").write_text("{not json, and not ours to delete")
    (victim / "1-deadbeef.json").write_text("{}")  # ashstream's name pattern, dead pid
    planted = shared_dir / f"ashstream-{os.getuid()}"
    if plant == "symlink":
        make = f"import os; os.symlink({str(victim)!r}, {str(planted)!r})"
        expected = "symbolic link"
    else:
        make = f"import os; os.mkdir({str(planted)!r}, 0o700)"
        expected = f"belongs to uid {NOBODY}"
    subprocess.run(as_nobody(sys.executable, "-c", make), check=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(shared_dir)}
    for args in ((), ("--json",)):
        result = _status(env, *args)
        assert result.returncode == 1, result
        assert_one_line(result.stderr, "cannot list the runs", str(planted), expected)
    assert sorted(p.name for p in victim.iterdir()) == ["1-deadbeef.json", "precious.json"]


def test_status_refuses_a_directory_others_can_read(tmp_path):
    runtime = tmp_path / f"ashstream-{os.getuid()}"
    runtime.mkdir()
    runtime.chmod(0o755)
    result = _status({**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert_one_line(result.stderr, "mode 0755", "0700")


def test_a_run_beside_a_planted_status_directory_still_runs_and_says_why_status_cannot_see_it(
    tmp_path,
):
    from tests.conftest import write_report

    runtime = tmp_path / f"ashstream-{os.getuid()}"
    runtime.symlink_to(tmp_path)
    report = write_report(tmp_path, {"name": "r", "source": {"duckdb": {"query": "SELECT 1 AS a"}}})
    result = subprocess.run(
        command("run", str(report), "-o", str(tmp_path / "r.typ"), "--workers", "1", "-q"),
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ashstream status" in result.stderr and "symbolic link" in result.stderr
    assert (tmp_path / "r.typ").is_file()


# What another user serves at a registry's address: a Manager's first reply, as a
# pickle that, unpickled, creates a file (it could as well run any code).
_ATTACKER = textwrap.dedent(
    """
    import os, sys
    from multiprocessing.connection import Listener

    class Payload:
        def __reduce__(self):
            return (open, (sys.argv[2], "w"))

    listener = Listener(sys.argv[1], authkey=bytes.fromhex(sys.argv[3]))
    os.chmod(sys.argv[1], 0o777)
    print("ready", flush=True)
    while True:
        try:
            conn = listener.accept()
            conn.recv()
            conn.send(Payload())
        except Exception:
            pass
    """
)


@needs_second_user
@pytest.mark.parametrize("socket_owner", ["attacker", "victim"])
def test_status_never_unpickles_a_reply_from_another_user(shared_dir, monkeypatch, socket_owner):
    from ashstream.engines.local.registry import running_pools
    from ashstream.status_files import runtime_dir_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared_dir / "runtime"))
    runtime = Path(runtime_dir_path())
    runtime.mkdir(mode=0o700, parents=True)
    address, evidence, key = shared_dir / "listener", shared_dir / "pwned", "ab" * 16
    attacker = subprocess.Popen(
        as_nobody(sys.executable, "-c", _ATTACKER, str(address), str(evidence), key),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert attacker.stdout.readline().strip() == "ready"
        if socket_owner == "victim":  # the file is ours; only the peer's uid tells
            os.chown(address, os.getuid(), os.getgid())
        # The status file is ours (no other user can write in the 0700 directory): this
        # checks the next line of defence, for a file whose address was swapped.
        status = {"pid": attacker.pid, "started_at": 0, "address": str(address), "authkey": key}
        (runtime / f"{attacker.pid}-0badcafe.json").write_text(json.dumps(status))
        [pool] = running_pools()
        assert pool["pid"] == attacker.pid and pool["registry"] == "unreachable"
        assert not evidence.exists()
    finally:
        attacker.kill()
        attacker.communicate(timeout=10)


# ------------------------------------------------------------------------------ SQL

_STACKED = "1; COPY (SELECT 42) TO '{target}'"
_ESCAPING = "1) ; COPY (SELECT 42) TO '{target}'; SELECT (1"


def _report_with(tmp_path: Path, key: str, fragment: str) -> Path:
    """A small report with ``fragment`` placed at ``key``."""
    from tests.conftest import write_report

    spec: dict = {"name": "r", "source": {"duckdb": {"query": "SELECT range AS i FROM range(3)"}}}
    if key == "source.duckdb.query":
        spec["source"]["duckdb"]["query"] = fragment
    elif key == "source.where":
        spec["source"]["where"] = fragment
    elif key == "source.order_by[0]":
        spec["source"]["order_by"] = [fragment]
    elif key == "fields[1].expr":
        spec["fields"] = ["i", {"name": "x", "expr": fragment}]
    elif key == "groups[0].expr":
        spec["groups"] = [{"name": "g", "expr": fragment}]
    return write_report(tmp_path, spec)


@pytest.mark.parametrize("command_name", ["run", "validate", "inspect"])
@pytest.mark.parametrize(
    "key", ["source.where", "source.order_by[0]", "fields[1].expr", "groups[0].expr"]
)
@pytest.mark.parametrize("shape", [_STACKED, _ESCAPING])
def test_a_fragment_is_one_expression_and_stacked_sql_never_runs(
    tmp_path, command_name, key, shape
):
    target = tmp_path / "written-by-the-report.csv"
    report = _report_with(tmp_path, key, shape.format(target=target))
    extra = ["-o", str(tmp_path / "r.typ"), "--no-progress"] if command_name == "run" else []
    result = subprocess.run(
        command(command_name, str(report), *extra), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result
    assert_one_line(result.stderr, f"{report}: {key}: expected one")
    assert not target.exists()
    assert not (tmp_path / "r.typ").exists()


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 42) TO '{target}'",
        "SELECT 1; COPY (SELECT 42) TO '{target}'",
        "ATTACH '{target}' AS other",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "PRAGMA version",
        "CREATE TABLE t AS SELECT 1",
        "EXPORT DATABASE '{target}'",
    ],
)
def test_a_query_is_one_read_only_statement_checked_before_it_runs(tmp_path, query):
    from ashstream.errors import ReportError
    from ashstream.report import load_report
    from ashstream.sources import sample_source

    target = tmp_path / "written-by-the-report"
    report = load_report(_report_with(tmp_path, "source.duckdb.query", query.format(target=target)))
    with pytest.raises(ReportError, match=r"source\.duckdb\.query: expected"):
        sample_source(report)
    assert not target.exists()


@pytest.mark.parametrize(
    "key, fragment",
    [
        ("source.where", "i >= 0 -- a comment that must not swallow what follows"),
        ("source.order_by[0]", "i DESC -- newest first"),
        ("fields[1].expr", "/* doubled */ i * 2"),
        ("source.duckdb.query", "SELECT range AS i FROM range(3) -- three rows"),
    ],
)
def test_expressions_with_comments_still_work(tmp_path, key, fragment):
    from ashstream.report import load_report
    from ashstream.sources import sample_source

    sample = sample_source(load_report(_report_with(tmp_path, key, fragment)))
    assert sample.sample.num_rows == 3


def _csv_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.csv").write_text("secret\nhunter2\n")
    return outside / "secret.csv"


@pytest.mark.parametrize(
    "key, shape",
    [
        ("fields[1].expr", "(SELECT first(secret) FROM read_csv('{path}'))"),
        ("source.duckdb.query", "SELECT * FROM read_csv('{path}')"),
        ("source.where", "i < (SELECT count(*) FROM read_text('{path}'))"),
    ],
)
def test_a_report_reads_nothing_outside_its_folder_unless_allowed(tmp_path, key, shape):
    secret = _csv_outside(tmp_path)
    folder = tmp_path / "report"
    folder.mkdir()
    report = _report_with(folder, key, shape.format(path=secret))
    out = folder / "r.typ"
    result = subprocess.run(
        command("run", str(report), "-o", str(out), "--no-progress"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert_one_line(result.stderr, str(secret), "source.allow_paths", "--allow-path")
    assert not out.exists()
    # The opt-in, on the command line and in the report, for the file or its folder.
    for allow in (str(secret), str(secret.parent)):
        result = subprocess.run(
            command("run", str(report), "-o", str(out), "-q", "--allow-path", allow),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        out.unlink()
    spec = yaml.safe_load(report.read_text())
    spec["source"]["allow_paths"] = ["../elsewhere"]
    report.write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        command("run", str(report), "-o", str(out), "-q"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" in out.read_text() or key != "fields[1].expr"


def test_a_report_reads_files_below_its_own_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lookup.csv").write_text("k,v\n0,zero\n1,one\n2,two\n")
    from ashstream.report import load_report
    from ashstream.sources import sample_source

    query = f"SELECT v FROM read_csv('{tmp_path / 'data' / 'lookup.csv'}') ORDER BY k"
    sample = sample_source(load_report(_report_with(tmp_path, "source.duckdb.query", query)))
    assert sample.sample.column("v").to_pylist() == ["zero", "one", "two"]


# --------------------------------------------------------------------- odd settings


def _small_report(tmp_path: Path, **extra) -> Path:
    from tests.conftest import write_report

    query = "SELECT range AS i, 'x' || range AS s FROM range(1000)"
    return write_report(tmp_path, {"name": "r", "source": {"duckdb": {"query": query}}, **extra})


def _run(*args: str, shell_prefix: str = "", **kwargs) -> subprocess.CompletedProcess:
    if shell_prefix:  # a shell closes a descriptor or sets a limit first
        line = " ".join(f"'{a}'" for a in command(*args))
        return subprocess.run(
            ["bash", "-c", f"{shell_prefix}; exec {line}"],
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=120, **kwargs)


def test_outputs_that_overwrite_each_other_or_an_input_are_refused_before_anything_runs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    report = _small_report(tmp_path)
    same = tmp_path / "same.pdf"
    result = _run("run", str(report), "-o", str(same), "--pdf", str(same), "-q")
    assert result.returncode == 2
    assert_one_line(result.stderr, "the PDF would overwrite the Typst module")
    assert not same.exists()
    before = report.read_text()
    result = _run("run", str(report), "-o", str(report), "-q")
    assert result.returncode == 2
    assert_one_line(result.stderr, "would overwrite the report file")
    assert report.read_text() == before
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), data)
    parquet_report = tmp_path / "p.yaml"
    parquet_report.write_text(yaml.safe_dump({"name": "p", "source": {"parquet": "data.parquet"}}))
    result = _run("run", str(parquet_report), "-o", str(tmp_path / "." / "data.parquet"), "-q")
    assert result.returncode == 2
    assert_one_line(result.stderr, "would overwrite a source file")
    assert pq.read_table(data).column("a").to_pylist() == [1, 2]


def test_a_huge_chunk_size_is_a_usage_error_everywhere(tmp_path):
    report = _small_report(tmp_path, pipeline={"chunk_size": 10**30})
    for name in ("validate", "run"):
        result = _run(name, str(report))
        assert result.returncode == 2
        assert_one_line(result.stderr, "pipeline.chunk_size", "10,000,000")
    result = _run("run", str(_small_report(tmp_path)), "--chunk-size", str(10**30))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--chunk-size" in result.stderr


def test_more_workers_than_the_machine_holds_are_capped_with_a_warning(caplog):
    from ashstream import StreamPool
    from ashstream.engines.local.pool import WORKERS_PER_CORE

    with caplog.at_level("WARNING", logger="ashstream"):
        pool = StreamPool(1000)  # nothing starts before open()
    assert pool.workers <= WORKERS_PER_CORE * len(os.sched_getaffinity(0))
    assert "1000 workers asked" in caplog.text


@pytest.mark.parametrize("engine", ["inline", "pool"])
def test_a_memory_limit_below_what_a_run_needs_fails_at_once_in_every_engine(tmp_path, engine):
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    pipeline = {"memory_limit": "1MB"}
    if engine == "inline":  # a small Parquet source runs in this process
        pq.write_table(pa.table({"a": list(range(1000))}), tmp_path / "d.parquet")
        report = tmp_path / "r.yaml"
        spec = {"name": "r", "source": {"parquet": "d.parquet"}, "pipeline": pipeline}
        report.write_text(yaml.safe_dump(spec))
        args = ["--json"]
    else:
        report = _small_report(tmp_path, pipeline=pipeline)
        args = ["--workers", "1", "--json"]
    started = time.monotonic()
    result = _run("run", str(report), "-o", str(tmp_path / "r.typ"), *args)
    assert time.monotonic() - started < 20  # the breaker's pause would take 30 s
    assert result.returncode == 1, result
    assert_one_line(result.stderr, "memory_limit")
    assert not (tmp_path / "r.typ").exists()


def test_a_closed_stdout_is_one_line_for_a_command_that_needs_it_and_no_matter_otherwise(tmp_path):
    report = _small_report(tmp_path)
    for args in (("status",), ("run", str(report), "-o", str(tmp_path / "a.typ"), "--json")):
        result = _run(*args, shell_prefix="exec 1>&-")
        assert result.returncode == 1, result
        assert_one_line(result.stderr, "standard output is closed")
    result = _run("run", str(report), "-o", str(tmp_path / "b.typ"), "-q", shell_prefix="exec 1>&-")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.typ").is_file()


def test_too_low_an_open_file_limit_is_one_line_before_any_process_starts(tmp_path):
    report = _small_report(tmp_path)
    out = tmp_path / "r.typ"
    result = _run("run", str(report), "-o", str(out), "--workers", "1", shell_prefix="ulimit -n 20")
    assert result.returncode == 1, result
    assert_one_line(result.stderr, "open-file limit (ulimit -n) is 20")
    assert not out.exists()


@pytest.mark.parametrize("case", ["decimal256", "duplicate column"])
def test_parquet_that_duckdb_would_read_changed_is_refused(tmp_path, case):
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "decimal256":
        value = decimal.Decimal("1234567890123456789012345678901234567890.5")
        table = pa.table({"d": pa.array([value], pa.decimal256(41, 1))})
        expected = "decimal256(41, 1), wider than DuckDB's 38 digits"
    else:
        table = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
        expected = "two columns named 'a'"
    pq.write_table(table, tmp_path / "d.parquet")
    report = tmp_path / "r.yaml"
    report.write_text(yaml.safe_dump({"name": "r", "source": {"parquet": "d.parquet"}}))
    run_args = ("run", str(report), "-o", str(tmp_path / "r.typ"), "--no-progress")
    for args in (("validate", str(report)), run_args):
        result = _run(*args)
        assert result.returncode == 1, result
        assert_one_line(result.stderr, expected)
    assert not (tmp_path / "r.typ").exists()


def test_fragments_that_pass_one_by_one_cannot_add_up_to_a_second_statement(tmp_path):
    """Found in review: a non-ASCII character before a trailing comment once hid the
    closing parenthesis, and a second field's $$ string then held a COPY."""
    from tests.conftest import write_report

    target = tmp_path / "pwn.csv"
    spec = {
        "name": "t",
        "source": {"duckdb": {"query": "SELECT 1 AS a"}},
        "fields": [
            {"name": "f0", "expr": "'é') -- x"},
            {
                "name": "f1",
                "expr": f"$$\n; COPY (SELECT 'owned') TO '{target}'; SELECT 1 AS f0 -- $$",
            },
        ],
    }
    report = write_report(tmp_path, spec)
    result = _run("validate", str(report))
    assert result.returncode == 2, result
    assert not target.exists()
    # and a legitimate trailing comment after a non-ASCII character keeps what follows
    spec = {
        "name": "o",
        "source": {
            "duckdb": {"query": "SELECT 'é' AS e, range AS a FROM range(5) -- the accent"},
            "order_by": ["length(e) -- é", "a DESC"],
        },
    }
    from ashstream.report import load_report
    from ashstream.sources import sample_source

    sample = sample_source(load_report(write_report(tmp_path, spec, "o.yaml")))
    assert sample.sample.column("a").to_pylist() == [4, 3, 2, 1, 0]


@pytest.mark.process
def test_two_streams_on_one_database_file_and_the_callers_own_connection_stay_apart(tmp_path):
    """The lock-down belongs to a DuckDB instance, and DuckDB shares one per file in a
    process: each stream attaches the file to a database of its own."""
    import duckdb

    from ashstream import StreamPool
    from tests.conftest import write_report

    database = tmp_path / "shop.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE orders AS SELECT range AS id FROM range(10)")
        con.execute("CREATE VIEW big AS SELECT * FROM orders WHERE id > 4")
    spec = {"name": "db", "source": {"duckdb": {"database": "shop.duckdb", "query": "FROM big"}}}
    report = write_report(tmp_path, spec)
    (tmp_path / "elsewhere.csv").write_text("a\n1\n")
    with StreamPool(1) as pool:
        first, second = pool.start(report), pool.start(report)
        assert [sum(c.num_rows for c in s) for s in (first, second)] == [5, 5]
    from ashstream.report import load_report
    from ashstream.sources import sample_source

    assert sample_source(load_report(report)).sample.num_rows == 5  # in this process
    with duckdb.connect(str(database), read_only=True) as own:  # not locked by ours
        assert own.sql(
            f"SELECT count(*) FROM read_csv('{tmp_path / 'elsewhere.csv'}')"
        ).fetchall() == [(1,)]
