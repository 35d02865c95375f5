"""The streaming engine with real processes, real shared memory and real DuckDB."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ashstream import (
    Cancelled,
    EncodeError,
    InlineStream,
    PipelineError,
    ReportError,
    SourceError,
    StreamPool,
    encode_rows,
    load_report,
)
from ashstream.stream_record import StreamRecord
from tests.conftest import mixed_sql, mixed_table, write_report
from tests.watch import segments_of_this_run

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def expected_text(table: pa.Table) -> bytes:
    return "".join(row + ",\n" for row in encode_rows(table).to_pylist()).encode()


def collect(chunks) -> tuple[bytes, list]:
    chunks = list(chunks)
    return b"".join(c.text for c in chunks), chunks


def assert_ordered(chunks) -> None:
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    first = 0
    for c in chunks:
        assert c.first_row == first
        assert len(c.rows()) == c.num_rows
        first += c.num_rows


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixed")
    spec = {"name": "mixed", "source": {"duckdb": {"query": mixed_sql(3000)}}}
    return load_report(write_report(directory, spec))


@pytest.mark.parametrize("workers", [1, 2, 3], ids=lambda w: f"{w}-workers")
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 65536], ids=lambda c: f"chunk-{c}")
def test_ordered_output_equals_single_process_encoding(pools, mixed_report, workers, chunk_size):
    text, chunks = collect(pools(workers).stream(mixed_report, chunk_size=chunk_size))
    assert text == expected_text(mixed_table(3000))
    assert_ordered(chunks)
    assert max(c.num_rows for c in chunks) <= chunk_size


def _parquet_files(directory, parts: int = 3, rows: int = 500):
    table = mixed_table(parts * rows).drop_columns(["pair", "info"])
    for i in range(parts):
        pq.write_table(table.slice(i * rows, rows), directory / f"part-{i}.parquet")
    return table


@pytest.mark.parametrize("form", ["file", "glob", "directory", "list"])
def test_parquet_sources(pools, tmp_path, form):
    data = tmp_path / "data"
    data.mkdir()
    table = _parquet_files(data)
    spec = {
        "file": "data/part-0.parquet",
        "glob": "data/part-*.parquet",
        "directory": "data",
        "list": "[data/part-0.parquet, data/part-1.parquet, data/part-2.parquet]",
    }[form]
    report = write_report(tmp_path, f"name: p\nsource:\n  parquet: {spec}\n")
    handle = pools(2).start(report, chunk_size=128)
    text, chunks = collect(handle)
    want = table.slice(0, 500) if form == "file" else table
    assert text == expected_text(want)
    assert handle.total_rows == want.num_rows  # from Parquet metadata
    assert_ordered(chunks)


def test_duckdb_query_with_params_where_order_by_and_fields(pools, tmp_path):
    import duckdb

    db = tmp_path / "shop.duckdb"
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE orders AS SELECT i AS id, 'c' || (i % 10) AS customer_name, "
        "TIMESTAMP '2024-01-01' + to_microseconds(i * 3600000000) AS created_at, "
        "(i % 13) - 3 AS amount FROM range(2000) t(i)"
    )
    con.close()
    report = write_report(
        tmp_path,
        """
        name: orders
        source:
          duckdb:
            database: shop.duckdb
            query: "SELECT * FROM orders WHERE created_at >= $start"
          where: amount > $min_amount
          order_by: [customer_name, id DESC]
          count_rows: true
        params:
          start: {type: datetime, default: 2024-01-10}
          min_amount: {type: int, default: 0}
        fields:
          - id
          - {name: customer, column: customer_name}
          - {name: day, expr: "CAST(created_at AS DATE)"}
          - amount
        """,
    )
    handle = pools(2).start(report, chunk_size=100, params={"min_amount": "5"})
    text, _ = collect(handle)
    expected = (
        duckdb.connect(str(db), read_only=True)
        .sql(
            "SELECT id, customer_name AS customer, CAST(created_at AS DATE) AS day, amount "
            "FROM orders WHERE created_at >= TIMESTAMP '2024-01-10' AND amount > 5 "
            "ORDER BY customer_name, id DESC"
        )
        .to_arrow_table()
    )
    assert expected.num_rows > 100
    assert text == expected_text(expected)
    assert handle.total_rows == expected.num_rows  # count_rows: true
    assert handle.columns == ("id", "customer", "day", "amount")
    _, pooled = collect(pools(2).start(report, 100, {"min_amount": "5"}))
    inline = InlineStream(load_report(report, {"min_amount": "5"}), chunk_size=100)
    chunks = list(inline)  # the same batch job in this process: the same chunks
    assert [(c.seq, c.first_row, c.text) for c in chunks] == [
        (c.seq, c.first_row, c.text) for c in pooled
    ]
    assert (inline.total_rows, inline.columns) == (handle.total_rows, handle.columns)


def test_empty_source_and_one_row(pools, tmp_path):
    empty = write_report(
        tmp_path, 'name: e\nsource: {duckdb: {query: "SELECT 1 AS a WHERE false"}}\n'
    )
    assert list(pools(2).stream(empty)) == []
    one = write_report(
        tmp_path, "name: o\nsource: {duckdb: {query: \"SELECT 'x' AS a\"}}\n", "one.yaml"
    )
    chunks = list(pools(2).stream(one))
    assert [c.rows() for c in chunks] == [['("a": "x")']]


def test_batches_and_rows_bigger_than_a_slot(tmp_path):
    slot = 64 * 1024
    report = write_report(
        tmp_path,
        f"""
        name: big
        source:
          duckdb:
            query: >
              SELECT i, repeat('x', CASE WHEN i = 5 THEN {3 * slot} ELSE 100 END) AS s
              FROM range(3000) t(i)
        """,
    )
    with StreamPool(2, slot_bytes=slot) as pool:
        text, chunks = collect(pool.stream(report, chunk_size=65536))
    import duckdb

    table = duckdb.connect().sql(load_report(report).source.query).to_arrow_table()
    assert text == expected_text(table)
    assert_ordered(chunks)
    assert len(chunks) > 3  # the batch was split to fit the slots
    assert any(c.num_rows == 1 and c.first_row == 5 for c in chunks)  # the huge row alone


def test_breaking_out_early_leaves_nothing_behind(tmp_path):
    report = write_report(
        tmp_path, 'name: b\nsource: {duckdb: {query: "SELECT * FROM range(1000000) t(i)"}}\n'
    )
    with StreamPool(2) as pool:
        for chunk in pool.stream(report, chunk_size=1000):
            assert chunk.seq == 0
            break
        assert segments_of_this_run() == []
        assert [s for s in pool.list() if s["status"] == "cancelled"]
        pids = pool.transformer_pids()
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert segments_of_this_run() == []


def test_five_concurrent_streams_on_one_pool(pools, tmp_path):
    reports = [
        write_report(
            tmp_path,
            f"name: s{i}\nsource: {{duckdb: {{query: \"SELECT i * {i} AS v, 'r{i}' AS r FROM range({2000 + 300 * i}) t(i)\"}}}}\n",
            f"s{i}.yaml",
        )
        for i in range(5)
    ]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            results[i] = b"".join(c.text for c in pools(2).stream(reports[i], chunk_size=97))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    import duckdb

    for i in range(5):
        table = duckdb.connect().sql(load_report(reports[i]).source.query).to_arrow_table()
        assert results[i] == expected_text(table)


def test_registry_records_each_stream(pools, tmp_path):
    report = write_report(
        tmp_path, 'name: reg\nsource: {duckdb: {query: "SELECT * FROM range(5000) t(i)"}}\n'
    )
    pool = pools(2)
    handle = pool.start(report, chunk_size=500)
    running = pool.status(handle.id)
    assert running["status"] in ("starting", "running")
    assert running["pids"]["transformers"] == pool.transformer_pids()
    rows = sum(c.num_rows for c in handle)
    entry = pool.status(handle.id)
    assert entry["status"] == "completed"
    assert entry["rows"] == rows == 5000
    assert entry["chunks"] == 10
    assert entry["report"] == "reg"
    assert entry["rows_per_s"] > 0
    assert entry["memory_pss_bytes"] > 0 and entry["memory_bytes"] > 0
    assert entry["restarts"] == 0 and entry["error"] is None
    assert set(entry) == {f.name for f in dataclasses.fields(StreamRecord)} | {"rows_per_s"}
    assert handle.id in {e["id"] for e in pool.list(status="completed")}


def test_source_errors_fail_the_stream_clearly(pools, tmp_path):
    bad_sql = write_report(tmp_path, 'name: x\nsource: {duckdb: {query: "SELEC 1"}}\n')
    with pytest.raises(
        ReportError, match=r"source\.duckdb\.query: DuckDB cannot parse the query: Parser Error"
    ):
        list(pools(2).stream(bad_sql))
    midway = write_report(
        tmp_path,
        "name: y\nsource: {duckdb: {query: \"SELECT CASE WHEN i < 5000 THEN i::VARCHAR ELSE 'x' END::INT AS v FROM range(10000) t(i)\"}}\n",
        "mid.yaml",
    )
    with pytest.raises(SourceError, match=r"reading failed after \d+ rows: Conversion Error"):
        list(pools(2).stream(midway, chunk_size=100))


def test_unsupported_column_fails_with_the_encoders_message(pools, tmp_path):
    report = write_report(
        tmp_path, 'name: u\nsource: {duckdb: {query: "SELECT union_value(k := 1) AS choice"}}\n'
    )
    with pytest.raises(EncodeError, match=r"column 'choice'.*CAST\(choice AS VARCHAR\)"):
        list(pools(2).stream(report))


def test_too_little_shared_memory_is_refused_before_anything_starts(pools, tmp_path):
    import os

    from ashstream import ResourceError

    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    report = write_report(tmp_path, 'name: r\nsource: {duckdb: {query: "SELECT 1 AS a"}}\n')
    with StreamPool(1, slot_bytes=free) as pool:
        with pytest.raises(ResourceError, match=r"/dev/shm has \d+ MiB free .*--shm-size"):
            pool.start(report)
        assert pool.list() == []


def test_stale_segments_of_dead_processes_are_swept_at_start(tmp_path):
    import subprocess
    import sys

    from ashstream.engines.local.shm import SEGMENT_PREFIX

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    name = f"{SEGMENT_PREFIX}{dead.stdout.strip()}_deadbeef"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(b"left by a process that was killed")
    try:
        with StreamPool(1):
            assert name not in segments_of_this_run()
    finally:
        if name in segments_of_this_run():
            os.unlink(path)


def test_streams_share_the_pools_producer_process_and_a_cancel_disturbs_no_other(tmp_path):
    report = write_report(
        tmp_path, 'name: r\nsource: {duckdb: {query: "SELECT * FROM range(50000) t(i)"}}\n'
    )
    with StreamPool(1) as pool:
        first = pool.start(report, chunk_size=1000)
        second = pool.start(report, chunk_size=1000)
        next(iter(second))
        second.cancel()  # while the first one is open on the same producer
        assert sum(c.num_rows for c in first) == 50000
        third = pool.start(report, chunk_size=1000)
        assert sum(c.num_rows for c in third) == 50000
        pids = {pool.status(h.id)["pids"]["producer"] for h in (first, second, third)}
        assert pool.status(second.id)["status"] == "cancelled"
    assert len(pids) == 1


def _write_parquet(path, table):
    pq.write_table(table, path)
    return path


BAD_PARQUET = {
    "corrupt": (
        lambda d: (d / "x.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1"),
        r"source\.parquet: .*x\.parquet is not a readable Parquet file",
    ),
    "type-drift": (
        lambda d: (
            _write_parquet(d / "a.parquet", pa.table({"v": [1, 2]})),
            _write_parquet(d / "b.parquet", pa.table({"v": ["1", "x"]})),
        ),
        r"column 'v' is string in .*b\.parquet but int64 in .*a\.parquet",
    ),
    "name-drift": (
        lambda d: (
            _write_parquet(d / "a.parquet", pa.table({"v": [1]})),
            _write_parquet(d / "b.parquet", pa.table({"w": [1]})),
        ),
        r"b\.parquet has columns \['w'\], but .*a\.parquet has \['v'\]",
    ),
    "invalid-utf8": (
        lambda d: _write_parquet(
            d / "u.parquet",
            pa.table(
                {
                    "s": pa.Array.from_buffers(
                        pa.string(),
                        2,
                        [
                            None,
                            pa.py_buffer(np.array([0, 1, 3], np.int32)),
                            pa.py_buffer(b"a\xff\xfe"),
                        ],
                    )
                }
            ),
        ),
        r"reading failed after 0 rows: .*Invalid string encoding .*u\.parquet",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PARQUET))
def test_bad_parquet_inputs_fail_with_one_clear_message(pools, tmp_path, case):
    make, message = BAD_PARQUET[case]
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    report = write_report(tmp_path, "name: bad\nsource: {parquet: data}\n")
    with pytest.raises(SourceError, match=message):
        list(pools(2).stream(report))


def test_a_file_deleted_before_the_reading_reaches_it_fails_naming_it(pools, tmp_path):
    """The caller holds the stream at its first chunk, so the producer, out of slot
    credits, is far from the last file (DuckDB reads ahead a bounded amount) when that
    file is deleted: the stream fails naming it, and claims nothing else."""
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({"i": np.arange(1_000_000), "j": np.arange(1_000_000) % 7})
    pq.write_table(table.slice(0, 960_000), data / "p0.parquet", row_group_size=2000)
    pq.write_table(table.slice(960_000, 20_000), data / "p1.parquet")
    pq.write_table(table.slice(980_000), data / "p2.parquet")
    report = write_report(tmp_path, "name: del\nsource: {parquet: data}\n")
    chunks = iter(pools(2).stream(report, chunk_size=1000))
    next(chunks)
    (data / "p2.parquet").unlink()
    with pytest.raises(SourceError, match=r"p2\.parquet"):
        for _ in chunks:
            pass


@pytest.fixture
def running_stream(pools, tmp_path):
    """A long stream on the shared 2-worker pool, past its first chunk."""
    report = write_report(
        tmp_path, 'name: c\nsource: {duckdb: {query: "SELECT * FROM range(100000000) t(i)"}}\n'
    )
    pool = pools(2)
    handle = pool.start(report, chunk_size=1000)
    stream = iter(handle)
    next(stream)
    return pool, handle, stream


def test_cancel_from_another_thread_stops_the_stream(running_stream):
    from ashstream import Cancelled

    pool, handle, stream = running_stream
    canceller = threading.Thread(target=pool.cancel, args=(handle.id,))
    canceller.start()
    canceller.join(10)
    with pytest.raises(Cancelled, match=f"stream {handle.id} was cancelled"):
        for _ in stream:
            pass
    assert pool.status(handle.id)["status"] == "cancelled"
    assert segments_of_this_run() == []


def test_closing_the_iterator_cancels_the_stream(running_stream):
    pool, handle, stream = running_stream
    stream.close()
    assert pool.status(handle.id)["status"] == "cancelled"
    assert segments_of_this_run() == []


@pytest.fixture(scope="module")
def one_reader(tmp_path_factory):
    """A pool that lets one stream read at a time, and a report that reads for a while.
    Its callers may leave their results waiting for 30 s before the queue moves past
    max_reading_streams anyway: a slow machine cannot let a stream in early. (When a
    queued stream's own caller waits, a twentieth of a second still does.)"""
    directory = tmp_path_factory.mktemp("queue")
    sql = "SELECT i, repeat('x', i % 90) AS s FROM range(300000) t(i)"
    report = load_report(
        write_report(directory, {"name": "q", "source": {"duckdb": {"query": sql}}})
    )
    with StreamPool(2, max_reading_streams=1, min_batch_rows=2000, caller_wait_s=30) as pool:
        yield pool, report


def test_a_stream_beyond_max_reading_streams_waits_queued_then_runs(one_reader):
    pool, report = one_reader
    alone = b"".join(c.text for c in pool.stream(report, chunk_size=5000))
    first = pool.start(report, chunk_size=5000)
    second = pool.start(report, chunk_size=5000)  # the first reads, and is read
    assert pool.status(second.id)["status"] == "queued"
    assert b"".join(c.text for c in first) == alone
    assert b"".join(c.text for c in second) == alone
    assert pool.status(second.id)["status"] == "completed"


def test_one_thread_reading_streams_in_turn_never_waits_on_the_queue_for_ever(one_reader):
    """The caller needs the queued streams' chunks to go on with the reading one: once
    the reading stream has waited on its caller, a queued one starts anyway."""
    pool, report = one_reader
    alone = [c.text for c in pool.stream(report, chunk_size=5000)]
    taken = []

    def read_in_turn() -> None:
        streams = [pool.stream(report, chunk_size=5000) for _ in range(3)]
        taken.extend(zip(*streams, strict=True))

    reader = threading.Thread(target=read_in_turn, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the queue never let the streams read in turn start"
    assert [[chunk.text for chunk in column] for column in zip(*taken, strict=True)] == [alone] * 3


def test_a_queued_stream_cancelled_never_starts_and_the_queue_moves_on(one_reader):
    pool, report = one_reader
    first = pool.start(report, chunk_size=5000)
    second, third = pool.start(report, chunk_size=5000), pool.start(report, chunk_size=5000)
    assert pool.status(second.id)["status"] == "queued"
    second.cancel()
    assert pool.status(second.id)["status"] == "cancelled"
    assert pool.status(second.id)["pids"]["producer"] is None  # no producer ever had it
    for handle in (first, third):
        assert sum(c.num_rows for c in handle) == 300000
    assert pool.list(status="queued") == []


def test_a_reading_stream_that_failed_no_longer_holds_back_the_queue(one_reader, tmp_path):
    """Its caller has not closed it yet; but nothing of it will run again, so its reading
    stops and the stream queued behind it must not wait for that caller. Failed in the
    producer (DuckDB) and in a transformer (a type with no Typst form)."""
    pool, report = one_reader
    sources = {
        SourceError: "SELECT error('boom') AS x",
        EncodeError: "SELECT union_value(n := i) AS u FROM range(300000) t(i)",
    }
    for error, sql in sources.items():
        failing = load_report(
            write_report(tmp_path, {"name": "f", "source": {"duckdb": {"query": sql}}})
        )
        failed = pool.start(failing)
        queued = pool.start(report, chunk_size=5000)
        assert sum(c.num_rows for c in queued) == 300000  # before anyone reads the failed one
        with pytest.raises(error):
            list(failed)


def test_a_pool_closes_with_streams_queued(one_reader, tmp_path):
    _, report = one_reader
    with StreamPool(1, max_reading_streams=1, caller_wait_s=30) as pool:
        reading = pool.start(report, chunk_size=5000)
        queued = [pool.start(report, chunk_size=5000) for _ in range(3)]
        chunks = iter(reading)  # kept: a dropped iterator cancels its stream
        next(chunks)
        assert [pool.status(q.id)["status"] for q in queued] == ["queued"] * 3
    with pytest.raises(Cancelled):  # with the pool
        list(queued[0])
    assert segments_of_this_run() == []


def test_inline_stream_encodes_on_threads_in_order_and_stops_them(tmp_path):
    """Batches encoded on several threads merge in source order, byte for byte as on
    one; a stream cancelled half-way leaves no encoding thread behind."""
    report = load_report(
        write_report(
            tmp_path,
            {
                "name": "t",
                "source": {
                    "duckdb": {"query": "SELECT i, repeat('x', i % 50) AS s FROM range(60000) t(i)"}
                },
            },
        )
    )

    def encoders() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("ashstream-encode")]

    one = [(c.seq, c.first_row, c.text) for c in InlineStream(report, 700, 2000, threads=1)]
    assert len(one) > 80
    assert [(c.seq, c.first_row, c.text) for c in InlineStream(report, 700, 2000, 4)] == one
    assert encoders() == []
    halfway = InlineStream(report, 700, 2000, threads=4)
    chunks = iter(halfway)
    next(chunks), next(chunks)
    assert encoders()  # batches ahead of the merge are being encoded
    halfway.cancel()
    assert encoders() == []


def test_inline_stream_on_threads_gives_what_was_read_before_a_read_error(tmp_path):
    """Batches read before the source fails are merged and given first, as when one
    thread does everything; then the error."""
    # DuckDB reads ahead of what it hands out: the failing row lies well past the start.
    # With the one DuckDB thread a source reads on, where it fails is the same every run.
    late = "CASE WHEN i = 1500000 THEN 'late' ELSE '1' END"
    sql = f"SELECT i, CAST({late} AS INTEGER) AS s FROM range(2000000) t(i)"
    report = load_report(
        write_report(tmp_path, {"name": "e", "source": {"duckdb": {"query": sql}}})
    )
    given = {}
    for threads in (1, 4):
        chunks = iter(InlineStream(report, 50_000, 20_000, threads))
        given[threads] = []
        with pytest.raises(SourceError, match="late"):
            for chunk in chunks:
                given[threads].append((chunk.first_row, chunk.text))
    assert 20 < len(given[1]) <= 30
    assert given[4] == given[1]


def test_pool_children_never_import_pandas(pools, mixed_report):
    """pyarrow would import pandas (~0.2 s) at a child's first batch; ashstream.startup
    tells it not to. The test extras install pandas (with Ray), so this can fail."""
    pytest.importorskip("pandas")
    handle = pools(2).start(mixed_report, chunk_size=1000)
    list(handle)
    producer = pools(2).status(handle.id)["pids"]["producer"]
    for pid in [producer, *pools(2).transformer_pids()]:
        with open(f"/proc/{pid}/maps") as maps:
            assert "/pandas/" not in maps.read(), f"child {pid} imported pandas"


def test_inline_stream_cuts_the_pools_batches_and_reports_its_errors(pools, tmp_path):
    """Wide rows are cut to fit a slot's share in both engines, so the chunks agree;
    an encoding error names the same rows; a stream is read once."""
    wide = write_report(
        tmp_path,
        {
            "name": "w",
            "source": {
                "duckdb": {"query": "SELECT i, repeat('x', 300) AS s FROM range(40000) t(i)"}
            },
        },
        "wide.yaml",
    )
    pooled = [(c.seq, c.first_row, c.num_rows) for c in pools(2).stream(wide, chunk_size=5000)]
    inline = InlineStream(load_report(wide), chunk_size=5000)
    assert [(c.seq, c.first_row, c.num_rows) for c in inline] == pooled
    assert len(pooled) > 8  # some batches were cut
    with pytest.raises(PipelineError, match="read once"):
        iter(inline)
    union = write_report(
        tmp_path,
        {
            "name": "u",
            "source": {
                "duckdb": {"query": "SELECT i, union_value(n := i) AS u FROM range(10) t(i)"}
            },
        },
        "union.yaml",
    )
    with pytest.raises(EncodeError) as from_pool:
        list(pools(2).stream(union))
    with pytest.raises(EncodeError) as from_inline:
        list(InlineStream(load_report(union)))
    assert str(from_inline.value) == str(from_pool.value)
    assert str(from_pool.value).startswith("rows 0..")


# ---- a stream's first chunk, read by pyarrow before DuckDB opens the source


def _types_table(rows: int) -> pa.Table:
    """A column of every type parquet_head takes, with nulls, escapes and odd floats."""
    i = np.arange(rows)
    floats = np.where(i % 5 == 0, np.nan, i / 3.0)
    floats[1:4] = [-0.0, np.inf, -np.inf]
    return pa.table(
        {
            "i8": pa.array(i % 100, pa.int8()),
            "u16": pa.array(i % 60000, pa.uint16()),
            "i64": pa.array(i * -(2**40), pa.int64()),
            "u64": pa.array(i.astype(np.uint64) + np.uint64(2**63)),
            "f32": pa.array(floats, pa.float32()),
            "f64": pa.array(floats, mask=i % 7 == 0),
            "flag": pa.array(i % 3 == 0),
            "text": pa.array([None if k % 4 == 0 else f'"{k}"\n\\\x00é' for k in i]),
            "day": pa.array(i % 3000, pa.int32()).cast(pa.date32()),
            "money": pa.array([f"{k}.0123456789" for k in i]).cast(pa.decimal128(38, 10)),
            "at": pa.array(i * 123_456_789, pa.int64()).cast(pa.timestamp("us")),
        }
    )


def _head_report(tmp_path, table: pa.Table, extra: str = "", **write) -> object:
    pq.write_table(table, tmp_path / "t.parquet", **write)
    return load_report(write_report(tmp_path, f"name: t\nsource:\n  parquet: t.parquet\n{extra}"))


def _read_all(report, chunk_size: int, head_first: bool) -> list[pa.RecordBatch]:
    from ashstream.batch_job import read_batches

    source = read_batches(report, chunk_size, min_batch_rows=2048, head_first=head_first)
    try:
        return list(source.batches)
    finally:
        source.close()


def test_the_first_chunk_read_by_pyarrow_is_duckdbs_and_the_batches_stay_the_same(pools, tmp_path):
    """parquet_head reads the first chunk of every type it takes as DuckDB's query
    gives it (renamed and picked by fields too); the stream's batches, their sizes and
    the pool's bytes are those of a stream read by DuckDB alone."""
    from ashstream.sources import open_source, parquet_head

    table = _types_table(5000)
    fields = "fields: [{name: amount, column: money}, text, i8]\n"
    for extra in ("", fields):
        report = _head_report(tmp_path, table, extra, row_group_size=3000)
        head = parquet_head(report, 700)
        duck = open_source(report, 700)
        try:
            first = next(duck.batches)
        finally:
            duck.close()
        assert head is not None and head.schema == duck.schema
        assert str(head.to_pylist()) == str(first.slice(0, 700).to_pylist())  # NaN, -0.0
        alone, with_head = _read_all(report, 700, False), _read_all(report, 700, True)
        assert [b.num_rows for b in with_head] == [b.num_rows for b in alone]
        assert expected_text(pa.Table.from_batches(with_head)) == expected_text(
            pa.Table.from_batches(alone)
        )
        text, chunks = collect(pools(2).stream(report, chunk_size=700))
        assert text == b"".join(c.text for c in InlineStream(report, chunk_size=700))
        assert_ordered(chunks)


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "where",
        "order_by",
        "expression",
        "missing-field",
        "hive-path",
        "zoned",
        "nanoseconds",
        "dictionary",
        "list",
        "short-row-group",
    ],
)
def test_the_first_chunk_waits_for_duckdb_where_pyarrow_could_read_it_otherwise(tmp_path, case):
    from ashstream.sources import parquet_head

    table = pa.table({"i": np.arange(3000), "s": pa.array([str(k) for k in range(3000)])})
    extra = {
        "where": "  where: i > 5\n",
        "order_by": "  order_by: [s]\n",
        "expression": "fields: [{name: j, expr: i + 1}]\n",
        "missing-field": "fields: [{name: j, column: nothere}]\n",
    }.get(case, "")
    columns = {
        "zoned": pa.array(np.arange(3000), pa.timestamp("us", tz="Europe/Paris")),
        "nanoseconds": pa.array(np.arange(3000), pa.timestamp("ns")),
        "dictionary": pa.array([str(k % 3) for k in range(3000)]).dictionary_encode(),
        "list": pa.array([[k] for k in range(3000)]),
    }
    if case in columns:
        table = table.append_column("x", columns[case])
    if case == "hive-path":
        tmp_path = tmp_path / "year=2024"
        tmp_path.mkdir()
    write = {"row_group_size": 500} if case == "short-row-group" else {}
    head = parquet_head(_head_report(tmp_path, table, extra, **write), 1000)
    assert (head is None) == (case != "plain")


def test_first_rows_that_duckdb_reads_otherwise_fail_the_stream(tmp_path):
    """The net under parquet_head: DuckDB's first rows are checked against the head."""
    from ashstream.batch_job import _HeadFirst
    from ashstream.sources import open_source

    report = _head_report(tmp_path, pa.table({"i": np.arange(3000)}))
    wrong = pa.record_batch({"i": np.arange(1, 1001)})
    source = _HeadFirst(wrong, 3000, lambda: open_source(report, 2048))
    try:
        with pytest.raises(PipelineError, match="first rows as pyarrow read them differ"):
            list(source.batches)
    finally:
        source.close()


# ---- chunks lent from the result slots


@pytest.fixture(scope="module")
def small_batches(tmp_path_factory):
    """A pool cutting a 6000-row source into 60 batches: its 4 result slots are reused."""
    directory = tmp_path_factory.mktemp("lent")
    spec = {"name": "lent", "source": {"duckdb": {"query": mixed_sql(6000)}}}
    with StreamPool(2, min_batch_rows=100) as pool:
        yield pool, load_report(write_report(directory, spec))


def test_chunks_a_caller_keeps_stay_valid_after_their_slot_is_reused(small_batches):
    """A chunk is a view of its result slot until the caller takes the next batch's:
    a chunk still held then takes a copy, so every chunk kept (a list, a loop's last
    one) holds its own text, and one dropped in time never cost a copy."""
    pool, report = small_batches
    stream = iter(pool.stream(report, chunk_size=40))
    first = next(stream)
    assert isinstance(first.view(), pa.Buffer)  # lent: no copy yet
    lent_text = first.view().to_pybytes()
    kept = [first, *stream]
    assert isinstance(first.view(), bytes) and first.text == lent_text
    assert b"".join(c.text for c in kept) == expected_text(mixed_table(6000))
    assert_ordered(kept)
    assert all(isinstance(c.view(), pa.Buffer) for c in pool.stream(report, chunk_size=40))


def test_a_chunk_kept_after_the_stream_stopped_outlives_the_arena(small_batches):
    """Leaving early: the chunks kept take their copies and the arena is unmapped."""
    pool, report = small_batches
    handle = pool.start(report, chunk_size=40)
    stream = iter(handle)
    kept = [next(stream) for _ in range(7)]
    stream.close()
    assert handle._state.arena._mmap.closed  # no view was left to keep it mapped
    rows = sum(c.num_rows for c in kept)
    assert b"".join(c.text for c in kept) == expected_text(mixed_table(rows))


def test_an_inline_stream_over_its_memory_limit_stops_at_its_first_batch(tmp_path):
    """The process's memory is read at most every MEMORY_CHECK_S, but first at once."""
    from ashstream import ResourceError

    spec = {
        "name": "m",
        "source": {"duckdb": {"query": mixed_sql(3000)}},
        "pipeline": {"memory_limit": "10MiB"},
    }
    report = load_report(write_report(tmp_path, spec))
    stream = InlineStream(report, chunk_size=100, min_batch_rows=100, threads=1)
    taken = []
    with pytest.raises(ResourceError, match=r"this process used .* over the report's"):
        taken.extend(stream)
    assert len(taken) <= 2  # of 30: the first batches merged (two are read ahead)
