"""The Ray engine on a real local cluster of two nodes (1 CPU each): the same module,
byte for byte, as the local engine; faults of workers and nodes; cancel; the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from ashstream import PipelineError, ResourceError, SourceError, load_report
from ashstream.engines.ray import RayPool
from ashstream.sinks import TypstModuleSink
from ashstream.stream_record import StreamRecord
from tests.conftest import assert_one_line, write_report

pytestmark = [pytest.mark.process, pytest.mark.slow]

# Rows of the test source, split over three Parquet files.
FILE_ROWS = (1500, 2500, 2000)

SOURCE_SQL = """
SELECT
    i AS id,
    ['north', 'south', 'east'][1 + (i % 3)::INT] AS region,
    (i // 400) AS week,
    CASE WHEN i % 11 = 0 THEN NULL
         ELSE 'quote " back \\ hash # dollar $ ' || chr(10) || 'ünï ' || i END AS note,
    (i * 1.25)::DECIMAL(12, 2) AS amount,
    CASE WHEN i % 13 = 0 THEN 'NaN'::DOUBLE ELSE i / 7.0 END AS ratio,
    TIMESTAMPTZ '2024-03-30 23:00:00+00' + to_minutes(i * 7) AS at,
    CASE WHEN i % 5 = 0 THEN NULL ELSE [i, i + 1] END AS pair,
    {{'k': i % 4, 's': 'x' || i}} AS info
FROM range({first}, {last}) t(i)
"""

FULL_REPORT = {
    "name": "ray_check",
    "source": {"parquet": "data", "where": "id % 17 <> 3 AND amount >= $low"},
    "params": {"low": {"type": "float", "default": 2.0}},
    "pipeline": {"timezone": "Europe/Berlin"},
    "fields": [
        {"name": "id"},
        {"name": "area", "column": "region"},
        {"name": "week"},
        {"name": "note"},
        {"name": "amount"},
        {"name": "ratio"},
        {"name": "at"},
        {"name": "pair"},
        {"name": "info"},
        {"name": "double_amount", "expr": "amount * 2"},
    ],
    "groups": [{"name": "area", "field": "area"}, {"name": "week", "field": "week"}],
    "variables": [
        {"name": "total", "function": "sum", "field": "amount", "reset": "report"},
        {"name": "area_total", "function": "sum", "field": "amount", "reset": "area"},
        {"name": "week_rows", "function": "count", "reset": "week"},
        {"name": "running", "function": "sum", "field": "ratio", "running": True},
    ],
    "charts": [{"name": "by_day", "x": "at", "y": "amount", "agg": "sum", "bucket": "day"}],
}


# Read on the cluster: Parquet, rows in group order (sorted: true), no running value.
CLUSTER_REPORT = {
    **FULL_REPORT,
    "name": "ray_parts",
    "source": {**FULL_REPORT["source"], "parquet": "parts", "sorted": True},
    "groups": [{"name": "week", "field": "week"}, {"name": "block", "expr": "id // 100"}],
    "variables": [
        {"name": "total", "function": "sum", "field": "amount", "reset": "report"},
        {"name": "week_total", "function": "sum", "field": "amount", "reset": "week"},
        {"name": "block_rows", "function": "count", "reset": "block"},
        {"name": "mean_ratio", "function": "avg", "field": "ratio", "reset": "week"},
        {"name": "median_amount", "function": "median", "field": "amount", "reset": "week"},
        {"name": "ratio_q", "function": "quantile", "q": [0.1, 0.9], "field": "ratio"},
        {
            "name": "p95_ratio",
            "function": "quantile",
            "q": 0.95,
            "method": "sketch",
            "field": "ratio",
            "reset": "block",
        },
        {"name": "top_weeks", "function": "top", "n": 3, "field": "week"},
        {"name": "mode_area", "function": "mode", "field": "area", "reset": "week"},
    ],
    "charts": [
        *FULL_REPORT["charts"],
        {"name": "median_by_day", "x": "at", "y": "ratio", "agg": "median", "bucket": "day"},
    ],
}


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each; this process joins as the driver, so RayPool uses it.
    Node deaths are noticed within about two seconds."""
    config = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    started = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": config},
    )
    started.add_node(num_cpus=1)
    started.wait_for_nodes()
    ray.init(address=started.address, log_to_driver=False)
    yield started
    ray.shutdown()
    started.shutdown()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """Three Parquet files of one schema (nested, decimal, zoned timestamp, strings),
    in data/ with one row group each and in parts/ with row groups of 500 rows."""
    root = tmp_path_factory.mktemp("ray")
    (root / "data").mkdir()
    (root / "parts").mkdir()
    first = 0
    for i, rows in enumerate(FILE_ROWS):
        sql = SOURCE_SQL.format(first=first, last=first + rows)
        duckdb.sql(f"COPY ({sql}) TO '{root / 'data' / f'part-{i}.parquet'}' (FORMAT parquet)")
        # DuckDB writes row groups of 2048 rows at least; pyarrow writes smaller ones.
        pq.write_table(duckdb.sql(sql).to_arrow_table(), root / "parts" / f"part-{i}.parquet", 500)
        first += rows
    return root


def module_of(stream, report, path: Path, chunks=None) -> bytes:
    """What ``ashstream run`` writes for ``stream`` (its chunks, taken through
    ``chunks`` when given): the Typst module's bytes."""
    sink = TypstModuleSink(path, report)
    sink.open()
    try:
        for chunk in stream if chunks is None else chunks:
            sink.write(chunk)
        sink.finish(stream.columns or (), stream.summary)
        sink.commit()
    except BaseException:
        sink.abort()  # a failed test leaves no open file for the next one to be blamed for
        raise
    return path.read_bytes()


def local_module(pools, report, chunk_size: int, path: Path) -> bytes:
    return module_of(pools(2).start(report, chunk_size), report, path)


@pytest.mark.parametrize("chunk_size", [1, 1000, 65536])
def test_same_module_as_the_local_engine(cluster, pools, source_dir, tmp_path, chunk_size):
    report = load_report(write_report(source_dir, FULL_REPORT, "full.yaml"), {"low": "3.5"})
    want = local_module(pools, report, chunk_size, tmp_path / "local.typ")
    with RayPool(min_batch_rows=700) as pool:  # several batches per file
        stream = pool.start(report, chunk_size)
        assert stream.read_on == "driver"  # sorted by DuckDB, with a running value
        got = module_of(stream, report, tmp_path / "ray.typ")
    assert got == want
    assert b"area_total" in got and b"by_day" in got and b"running" in got


@pytest.mark.parametrize("chunk_size", [1, 1000, 65536])
def test_parquet_read_on_the_cluster_gives_the_same_module(
    cluster, pools, source_dir, tmp_path, chunk_size
):
    report = load_report(write_report(source_dir, CLUSTER_REPORT, "parts.yaml"), {"low": "3.5"})
    want = local_module(pools, report, chunk_size, tmp_path / "local.typ")
    with RayPool(min_batch_rows=200) as pool:  # parts of 1000 rows: two row groups
        stream = pool.start(report, chunk_size)
        assert stream.read_on == "cluster"
        got = module_of(stream, report, tmp_path / "ray.typ")
    assert got == want
    assert b"week_total" in got and b"by_day" in got
    assert b'"median_amount": ' in got and b'"top_weeks": ((' in got


def test_a_file_gone_on_a_node_is_one_clear_error(cluster, source_dir, tmp_path):
    shutil.copytree(source_dir / "parts", tmp_path / "parts")
    report = load_report(write_report(tmp_path, CLUSTER_REPORT, "parts.yaml"))
    with RayPool(min_batch_rows=200) as pool:
        chunks = iter(pool.start(report, 1000))
        next(chunks)  # parts of the first files are read now, the last file's not yet
        (tmp_path / "parts" / "part-2.parquet").unlink()
        with pytest.raises(
            SourceError, match=r"part-2.parquet is not a readable Parquet.*Ray node"
        ):
            list(chunks)


def test_duckdb_query_source(cluster, pools, tmp_path):
    report = load_report(
        write_report(
            tmp_path,
            {
                "name": "query",
                "source": {
                    "duckdb": {
                        "query": "SELECT i, 'v' || i AS s, i * 0.5 AS h FROM range(5000) t(i) "
                        "WHERE i % $m = 0"
                    },
                    "order_by": ["h DESC"],
                },
                "params": {"m": {"type": "int", "default": 3}},
            },
        )
    )
    want = local_module(pools, report, 500, tmp_path / "local.typ")
    with RayPool(min_batch_rows=400) as pool:
        got = module_of(pool.start(report, 500), report, tmp_path / "ray.typ")
    assert got == want


def test_the_drivers_memory_limit_holds_on_ray(cluster, tmp_path):
    spec = {
        "name": "low",
        "source": {"duckdb": {"query": "SELECT i FROM range(100000) t(i)"}},
        "pipeline": {"memory_limit": "1MB"},  # the driver alone needs more
    }
    report = load_report(write_report(tmp_path, spec))
    expected = r"the Ray driver used .* pipeline.memory_limit of 1 MiB"
    with RayPool(min_batch_rows=400) as pool, pytest.raises(ResourceError, match=expected):
        list(pool.start(report, 500))


def _encoding_workers(processes=None) -> list[psutil.Process]:
    """Ray worker processes (of all, or of ``processes``) running our encode task now:
    Ray titles them ray::encode."""
    found = []
    for process in psutil.process_iter() if processes is None else processes:
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith("ray::encode"):
            found.append(process)
    return found


def _wait_for(condition, what: str, timeout_s: float = 60.0, interval_s: float = 0.1):
    """``condition()``'s first true value, asked every ``interval_s``: for a state of
    another process that nothing announces (Ray's workers say nothing to the driver)."""
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(interval_s)
    return found


def _big_report(source_dir: Path) -> object:
    return load_report(
        write_report(
            source_dir,
            {
                "name": "big",
                "source": {"duckdb": {"query": SOURCE_SQL.format(first=0, last=120_000)}},
                "variables": [{"name": "run", "function": "sum", "field": "id", "running": True}],
            },
            "big.yaml",
        )
    )


def test_worker_killed_mid_run_gives_the_same_module(cluster, pools, source_dir, tmp_path):
    report = _big_report(source_dir)
    want = local_module(pools, report, 1000, tmp_path / "local.typ")
    killed = []

    def kill_one_worker(stream):
        for i, chunk in enumerate(stream):
            if not killed and i >= 5:
                # Asked without a pause: the tasks in flight are short, and while this
                # waits the driver sends no others.
                busy = _wait_for(_encoding_workers, "Ray worker encoding", 10, interval_s=0)
                worker = busy[0]
                worker.send_signal(signal.SIGKILL)
                killed.append(worker.pid)
            yield chunk

    with RayPool(min_batch_rows=2000) as pool:
        stream = pool.start(report, 1000)
        got = module_of(stream, report, tmp_path / "ray.typ", kill_one_worker(stream))
    assert killed, "no Ray worker was seen encoding"
    assert got == want


def test_node_removed_mid_run_gives_the_same_module(cluster, pools, source_dir, tmp_path):
    report = _big_report(source_dir)
    want = local_module(pools, report, 1000, tmp_path / "local.typ")
    node = next(iter(cluster.worker_nodes))

    def remove_the_node(stream):
        for i, chunk in enumerate(stream):
            if i == 5:
                cluster.remove_node(node, allow_graceful=False)
            yield chunk

    try:
        with RayPool(min_batch_rows=2000) as pool:
            stream = pool.start(report, 1000)
            got = module_of(stream, report, tmp_path / "ray.typ", remove_the_node(stream))
    finally:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)
        cluster.add_node(num_cpus=1)  # for the tests after this one
        cluster.wait_for_nodes()
    assert got == want


def test_cancel_frees_every_object_of_the_stream(cluster, source_dir):
    core = ray._private.worker.global_worker.core_worker
    assert not core.get_all_reference_counts()
    with RayPool(min_batch_rows=2000) as pool:
        stream = pool.start(_big_report(source_dir), 1000)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        assert core.get_all_reference_counts(), "no batch was in flight"
        stream.cancel()
        _wait_for(lambda: not core.get_all_reference_counts(), "freeing", timeout_s=10)
        with pytest.raises(StopIteration):
            next(chunks)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ashstream", *args]


def test_cli_on_the_cluster_matches_the_local_run(cluster, source_dir, tmp_path):
    report = write_report(source_dir, FULL_REPORT, "full.yaml")
    outputs = {}
    for engine, extra in (("local", ["--inline-rows", "0"]), ("ray", ["--engine", "ray"])):
        out = tmp_path / f"{engine}.typ"
        result = subprocess.run(
            command("run", str(report), "-o", str(out), "--json", *extra),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["engine"] == engine
        outputs[engine] = out.read_bytes().replace(out.name.encode(), b"")
    assert summary["workers"] == 2  # the cluster's CPUs
    assert outputs["ray"] == outputs["local"]


def test_unreachable_cluster_is_one_clear_error(source_dir, tmp_path):
    out = tmp_path / "out.typ"
    report = write_report(source_dir, FULL_REPORT, "full.yaml")
    started = time.monotonic()
    result = subprocess.run(
        command("run", str(report), "-o", str(out), "--ray-address", "127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Error: cannot reach the Ray cluster at 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert not out.exists() and not list(tmp_path.iterdir())


# The command, then what it left running while its process still lives: a library
# caller's process lives on after a failed start, where the kernel kills nothing.
RUN_THEN_LIST_CHILDREN = """
import json, sys
import psutil
from ashstream.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
left = [" ".join(p.cmdline()) or p.name() for p in psutil.Process().children(recursive=True)]
print(json.dumps({"exit_code": code, "left": left}))
"""

# Ray's own settings that make a local start fail for real. Ray runs an agent under
# memray with the options given, so an option memray refuses kills the runtime env
# agent as it starts; the raylet goes down with it, and ray.init waits its 30 s for
# the node before it raises the bare Exception an agent's death gives.
AGENT_DIES = {
    "RAY_INTERNAL_MEM_PROFILE_COMPONENTS": "runtime_env_agent",
    "RAY_INTERNAL_MEM_PROFILE_OPTIONS": "--no-such-option",
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("fault", "says"),
    [
        pytest.param(
            AGENT_DIES,
            (
                "Error: Ray could not start on this machine: The current node timed out "
                "during startup",
                "; the raylet said: runtime_env_agent failed",
                "; Ray's logs of the attempt are in ",
            ),
            id="an agent dies",
        ),
        pytest.param(
            {"RAY_TMPDIR": "{file}"},
            ("Error: Ray could not start on this machine: [Errno 20] Not a directory",),
            id="its temp folder is a file",
        ),
    ],
)
def test_a_local_ray_that_cannot_start_is_one_line_and_leaves_nothing(
    source_dir, tmp_path, fault, says
):
    (tmp_path / "a-file").touch()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({k: v.format(file=tmp_path / "a-file") for k, v in fault.items()})
    out = tmp_path / "out"
    out.mkdir()
    report = write_report(source_dir, FULL_REPORT, "full.yaml")
    args = ["run", str(report), "-o", str(out / "r.typ"), "--pdf", str(out / "r.pdf")]
    result = subprocess.run(
        [sys.executable, "-c", RUN_THEN_LIST_CHILDREN, *args, "--engine", "ray"],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert_one_line(result.stderr, *says)
    assert json.loads(result.stdout) == {"exit_code": 1, "left": []}
    assert list(out.iterdir()) == []
    if "logs of the attempt" in says[-1]:
        logs = result.stderr.split(says[-1])[1].split()[0]
        assert (Path(logs) / "raylet.out").is_file()


def test_differing_schemas_fail_before_any_output(cluster, source_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    duckdb.sql(f"COPY (SELECT 1 AS id, 'a' AS s) TO '{data / 'a.parquet'}' (FORMAT parquet)")
    duckdb.sql(f"COPY (SELECT 2 AS id, 2.5 AS s) TO '{data / 'b.parquet'}' (FORMAT parquet)")
    report = load_report(write_report(tmp_path, {"name": "drift", "source": {"parquet": "data"}}))
    with RayPool() as pool, pytest.raises(Exception, match="column 's' is"):
        list(pool.stream(report))


def test_ray_pool_checks_the_address_before_joining():
    with pytest.raises(PipelineError, match="not host:port"):
        from ashstream.engines.ray import check_reachable

        check_reachable("nowhere")


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_run_and_its_local_ray(source_dir, tmp_path, sig, code):
    """No address: the run starts a Ray of its own, and takes it down when stopped."""
    report = write_report(
        source_dir,
        {
            "name": "long",
            "source": {"duckdb": {"query": SOURCE_SQL.format(first=0, last=3_000_000)}},
        },
        "long.yaml",
    )
    out = tmp_path / "out.typ"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen(
        command("run", str(report), "-o", str(out), "--engine", "ray", "--no-progress"),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        children = _wait_for(
            lambda: _encoding_workers(_ray_processes_of(run.pid)) and _ray_processes_of(run.pid),
            "the run's Ray encoding a batch",
        )
        run.send_signal(sig)
        # 3M rows take far longer than the timeout: exiting within it, with the signal's
        # code and no summary, is the signal's doing (a wall-clock bound would flake).
        _, stderr = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == code, stderr
    assert "Cancelled" in stderr and "Traceback" not in stderr and "rows in" not in stderr
    assert not out.exists()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_the_local_engine_never_imports_ray():
    code = (
        "import sys, ashstream, ashstream.cli, ashstream.engines.local.pool; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


RECORD_KEYS = {f.name for f in dataclasses.fields(StreamRecord)} | {"rows_per_s"}


def test_status_lists_a_running_ray_stream(cluster, source_dir):
    from ashstream.engines.local.registry import running_pools

    with RayPool(min_batch_rows=2000) as pool:
        stream = pool.start(_big_report(source_dir), 1000)
        chunks = iter(stream)
        next(chunks)
        [mine] = [p for p in running_pools() if p["pid"] == os.getpid() and p["engine"] == "ray"]
        [entry] = mine["streams"]
        assert entry["id"] == stream.id and entry["status"] == "running"
        assert set(entry) == RECORD_KEYS  # the local pool's record, field for field
        assert entry["memory_bytes"] > 0 and entry["pids"] == {"driver": os.getpid()}
        stream.cancel()
    assert [p for p in running_pools() if p["pid"] == os.getpid() and p["engine"] == "ray"] == []


@pytest.mark.parametrize(
    ("changes", "reader"),
    [
        ({}, "cluster"),
        ({"groups": [{"name": "week", "field": "week"}]}, "driver"),  # DuckDB sorts
        ({"source": {"parquet": "parts", "order_by": ["id"]}}, "driver"),
        ({"variables": [{"name": "r", "function": "count", "running": True}]}, "driver"),
        ({"source": {"parquet": "parts", "where": "id > (SELECT avg(id) FROM t)"}}, "driver"),
        ({"fields": [{"name": "n", "expr": "row_number() OVER ()"}]}, "driver"),
        ({"source": {"duckdb": {"query": "SELECT 1 AS id"}}}, "driver"),
    ],
)
def test_which_reports_are_read_on_the_cluster(source_dir, changes, reader):
    from ashstream.engines.ray import reads_on_cluster

    definition = {"name": "which", "source": {"parquet": "parts"}, **changes}
    report = load_report(write_report(source_dir, definition, "which.yaml"))
    assert ("cluster" if reads_on_cluster(report) else "driver") == reader


@pytest.mark.parametrize(
    "extra", [["--workers", "2"], ["--inline-rows", "10"], ["--engine", "local"]]
)
def test_options_that_do_not_apply_on_ray_are_usage_errors(source_dir, extra):
    report = write_report(source_dir, FULL_REPORT, "full.yaml")
    result = subprocess.run(
        command("run", str(report), "--ray-address", "127.0.0.1:9", *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_closing_the_pool_cancels_a_stream_left_unfinished(cluster, source_dir):
    """An exception in the caller's loop leaves the stream suspended; closing the pool
    cancels it while Ray is still there (not when the generator is collected later,
    when ray.cancel would start a new Ray of its own)."""
    core = ray._private.worker.global_worker.core_worker
    failed = pytest.raises(RuntimeError, match="the caller's loop failed")
    with failed, RayPool(min_batch_rows=2000) as pool:
        chunks = iter(pool.start(_big_report(source_dir), 1000))
        next(chunks)
        raise RuntimeError("the caller's loop failed")
    _wait_for(lambda: not core.get_all_reference_counts(), "freeing", timeout_s=10)
    assert next(chunks, None) is None  # closed
