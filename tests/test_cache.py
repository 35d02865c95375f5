"""The incremental cache: a cached run writes the very bytes of a cold run, whatever
changed between runs, and reuses what did not; bad entries are recomputed."""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import fcntl
import fractions
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ashstream import Aggregate
from ashstream import cache as cache_module
from ashstream.cache import HEADER_BYTES, CacheStore, fingerprint
from ashstream.cache_codec import CodecError, dumps, loads
from ashstream.report import load_report
from ashstream.runner import RunStage, run_report
from tests.example_aggregates import Collected

GROUPED = {
    "source": {"sorted": True},
    "groups": [
        {"name": "month", "expr": "date_trunc('month', day)"},
        {"name": "day", "field": "day"},
    ],
    "variables": [
        {"name": "revenue", "function": "sum", "field": "amount", "reset": "day"},
        {
            "name": "running",
            "function": "sum",
            "field": "amount",
            "reset": "month",
            "running": True,
        },
        {"name": "runs", "function": "count", "reset": "report", "running": True},
        {"name": "median", "function": "median", "field": "amount", "reset": "month"},
        {"name": "kinds", "function": "count_distinct", "field": "qty"},
        {"name": "top", "function": "top", "n": 3, "field": "qty"},
        {"name": "last_note", "function": "last", "field": "note", "reset": "day"},
    ],
    "charts": [
        {
            "name": "by_week",
            "x": "day",
            "y": "amount",
            "agg": "sum",
            "bucket": "auto",
            "points": 20,
        },
        {"name": "trace", "x": "id", "y": "ratio", "agg": "none", "points": 30},
    ],
}
PLAIN = {"variables": [{"name": "total", "function": "sum", "field": "amount"}]}


def write_day(folder: Path, day: int, rows: int = 300, seed: int = 0) -> Path:
    """A day's Parquet file, rows in group order; ``seed`` changes its values."""
    path = folder / f"d{day:03d}.parquet"
    duckdb.connect().execute(
        f"""COPY (SELECT ({day} * 100000 + i)::BIGINT AS id,
               DATE '2024-01-25' + {day} AS day,
               ((i * 7919 + {seed}) % 10000 / 100.0)::DECIMAL(10, 2) AS amount,
               (i + {seed}) / 7.0 AS ratio,
               ((i + {seed}) % 13)::INTEGER AS qty,
               CASE WHEN i % 5 = 0 THEN NULL ELSE 'n' || (i + {seed}) END AS note
           FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 100)"""
    )
    return path


def report_file(folder: Path, extra: dict, name: str = "r.yaml") -> Path:
    spec = {"name": "days", "source": {"parquet": "data/*.parquet"}, **extra}
    spec["source"] = {"parquet": "data/*.parquet", **extra.get("source", {})}
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def run(report: Path, out: Path, cache: Path | None = None, **kwargs) -> dict:
    summary = run_report(report, output=out, cache=cache or False, inline_rows=10**9, **kwargs)
    return summary.to_dict()


@pytest.fixture
def days(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for day in range(4):
        write_day(tmp_path / "data", day)
    return tmp_path


def assert_same_as_cold(report: Path, tmp_path: Path, cache: Path, **kwargs) -> dict:
    cold, cached = tmp_path / "cold.typ", tmp_path / "cached.typ"
    run(report, cold, **kwargs)
    summary = run(report, cached, cache, **kwargs)
    assert cached.read_bytes() == cold.read_bytes()
    return summary["cache"]


# --------------------------------------------------------------------------- codec

VALUES = [
    None,
    True,
    0,
    -(2**63),
    2**200,
    -1.5,
    float("nan"),
    float("-inf"),
    -0.0,
    "é\n\ud800",
    b"\x00\xff",
    decimal.Decimal("-1.230E+7"),
    decimal.Decimal("sNaN"),
    fractions.Fraction(-3, 7),
    dt.date(1, 1, 1),
    dt.datetime(2024, 3, 31, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),
    dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
    dt.time(23, 59, 59, 999999),
    dt.timedelta(days=-2, microseconds=7),
    (1, (2.5, None)),
    [[], {}],
    {1, 2, 3},
    frozenset({"a"}),
    {"k": [1], (1, 2): {3: 4}},
    list(range(40)),
    {i: i * 1.5 for i in range(20)},
    (*[float(i) for i in range(10)], float("nan"), -0.0),
    np.int64(-3),
    np.float64(-0.0),
    np.array([1.5, np.nan, -0.0]),
    np.arange(6, dtype=np.int32).reshape(2, 3),
    np.array([dt.date(2020, 1, 1), None, "x"], dtype=object),
    np.array(["2020-01-01T00:00:00.000001"], dtype="datetime64[us]"),
    (np.array([1, 2], dtype=np.int64), np.array([0.5], dtype=np.float64)),
    pa.decimal128(12, 2),
    pa.timestamp("us", "Asia/Tokyo"),
    pa.list_(pa.struct([pa.field("a", pa.int8())])),
    pa.array([dt.datetime(2024, 1, 1, 12), None], pa.timestamp("us", "Asia/Tokyo")),
    pa.array([decimal.Decimal("1.25"), None], pa.decimal128(12, 2)),
    pa.array(["é", None, ""]),
    pa.array([], pa.float64()),
]


def same(a: object, b: object) -> bool:
    """Equal, and of the same type, NaN and -0.0 included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b))
    if isinstance(a, pa.Array):
        return a.type == b.type and a.equals(b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and repr(a) == repr(b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, dt.datetime):
        return a == b and a.fold == b.fold and a.utcoffset() == b.utcoffset()
    return a == b


@pytest.mark.parametrize(
    "value", VALUES, ids=[type(v).__name__ + str(i) for i, v in enumerate(VALUES)]
)
def test_the_codec_gives_back_what_it_was_given(value):
    assert same(loads(dumps(value)), value)


@pytest.mark.parametrize(
    "value",
    [object(), threading.Lock(), np.array(["x"]), np.zeros(2, dtype=[("a", "i4")]), 1j + 0],
    ids=["object", "lock", "str-array", "structured", "complex"],
)
def test_the_codec_refuses_what_it_does_not_know(value):
    with pytest.raises(CodecError, match="cannot be cached"):
        dumps([1, value])


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


TWO_COLUMNS = _ipc(pa.table({"a": [1], "b": [2]}))


@pytest.mark.parametrize(
    "planted",
    [
        b"R\x1b\x00\x00\x00posix.system",
        b"R" + (18).to_bytes(4, "little") + b"builtins.eval:xxxx",
        b"\x80\x04\x95",  # a pickle
        b"(" * 10000,
        b"P[i\xff\xff\xff\x7f",
        b"a" + (3).to_bytes(4, "little") + b"<i8" + b"\x01\x00\x00\x00" + b"\xff" * 8,
        b"",
        b"Nx",
        b"W\x04\x00\x00\x00\xff\xff\xff\xff",
        b"W" + len(TWO_COLUMNS).to_bytes(4, "little") + TWO_COLUMNS,
    ],
)
def test_planted_bytes_never_build_anything_else(planted):
    with pytest.raises(CodecError):
        loads(planted)


def test_an_arrow_array_with_planted_offsets_is_refused():
    raw = _ipc(pa.table({"v": ["hello", "x"]}))
    offsets = np.array([0, 5, 6], np.int32).tobytes()
    assert raw.count(offsets) == 1
    raw = raw.replace(offsets, np.array([0, 5, 900], np.int32).tobytes())
    with pytest.raises(CodecError, match="out of bounds"):
        loads(b"W" + len(raw).to_bytes(4, "little") + raw)


# ------------------------------------------------------- a unit's partials, joined


def day_table(rows: int, seed: int) -> pa.Table:
    """Rows in (month, day) order with every kind of state the variables keep."""
    rng = np.random.default_rng(seed)
    days = np.sort(rng.integers(0, 70, rows))
    day = pa.array(days.astype("datetime64[D]").astype(object), pa.date32())
    month = pa.array([dt.date(d.year, d.month, 1) for d in day.to_pylist()], pa.date32())
    ratio = rng.choice([0.5, -0.0, 0.0, np.nan, 2.25, np.inf, 1e300], rows)
    amount = [decimal.Decimal(int(v)) / 100 for v in rng.integers(-(10**6), 10**6, rows)]
    return pa.table(
        {
            "id": pa.array(np.arange(rows) * 3 + seed, pa.int64()),
            "month": month,
            "day": day,
            "amount": pa.array(amount, pa.decimal128(10, 2)),
            "ratio": pa.array(ratio, pa.float64()),
            "qty": pa.array(rng.integers(0, 13, rows), pa.int32()),
            "note": pa.array([None if v % 5 == 0 else f"n{v}" for v in rng.integers(0, 50, rows)]),
        }
    )


JOINED = {
    **GROUPED,
    "groups": [{"name": "month", "field": "month"}, {"name": "day", "field": "day"}],
    "variables": [v for v in GROUPED["variables"] if not v.get("running")]
    + [
        {"name": "p90", "function": "quantile", "q": 0.9, "method": "sketch", "field": "ratio"},
        {"name": "sum_ratio", "function": "sum", "field": "ratio", "reset": "month"},
        # merged in place: the unit and the collector must not share its state
        {"name": "top_month", "function": "top", "n": 2, "field": "qty", "reset": "month"},
        {"name": "qtys", "function": "collected", "field": "qty", "reset": "day"},
        {"name": "all_qtys", "function": "collected", "field": "qty"},
    ],
}


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 400),
    seed=st.integers(0, 1000),
    cuts=st.lists(st.integers(1, 399), max_size=12),
    joins=st.lists(st.booleans(), min_size=13, max_size=13),
)
def test_joined_partials_give_the_collector_what_the_batches_do(
    tmp_path_factory, rows, seed, cuts, joins
):
    from ashstream.analysis.aggregate import Analysis, Collector, analyse_batch, join_partials

    folder = tmp_path_factory.mktemp("joined")
    table = day_table(rows, seed)
    (folder / "data").mkdir()
    pa.parquet.write_table(table, folder / "data" / "d.parquet")
    report = load_report(report_file(folder, JOINED), aggregates={"collected": Collected})
    analysis = Analysis.of(report)
    bounds = sorted({0, rows, *(c for c in cuts if c < rows)})
    partials = [
        analyse_batch(table.slice(a, b - a).combine_chunks().to_batches()[0], analysis, a)
        for a, b in itertools.pairwise(bounds)
    ]
    by_batch, by_unit = Collector(analysis), Collector(analysis)
    closed_by_batch, closed_by_unit, unit, unit_first = [], [], None, 0
    for i, (first, partial) in enumerate(zip(bounds, partials, strict=False)):
        # as the cache's merge does: the unit takes a copy, the collector the original
        mine = copy.deepcopy(partial)
        unit = mine if unit is None else join_partials(analysis, unit, mine)
        closed_by_batch += by_batch.add(partial, first)
        if not joins[i] or i == len(partials) - 1:
            closed_by_unit += by_unit.add(unit, unit_first)
            unit, unit_first = None, bounds[i + 1]
    closed_by_batch += by_batch.finish()
    closed_by_unit += by_unit.finish()
    assert dumps(closed_by_unit) == dumps(closed_by_batch)
    assert dumps(by_unit.report_totals()) == dumps(by_batch.report_totals())
    assert dumps(by_unit.chart_results()) == dumps(by_batch.chart_results())


# ------------------------------------------------------------------ reuse, exactly


@pytest.mark.parametrize("spec", [GROUPED, PLAIN], ids=["grouped-running-charts", "plain"])
def test_cached_runs_write_the_bytes_of_a_cold_run(days, spec):
    report, cache = report_file(days, spec), days / "cache"
    first = assert_same_as_cold(report, days, cache)
    assert first == {"reused_rows": 0, "computed_rows": 1200, "mode": "units"}
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200
    write_day(days / "data", 4)  # a day appended: only it is read
    again = assert_same_as_cold(report, days, cache)
    assert again == {"reused_rows": 1200, "computed_rows": 300, "mode": "units"}


def test_units_the_collector_takes_in_segments_write_the_bytes_of_a_cold_run(days, monkeypatch):
    """A unit of more batches than SEGMENT_BATCHES reaches the collector in pieces
    (its checks run that often); its entry holds them as taken, fed so again."""
    monkeypatch.setattr(cache_module, "SEGMENT_BATCHES", 1)
    segments = []
    put = cache_module.CacheMerge._put

    def counted(merge, unit, meta):
        segments.append(len(unit.segments))
        put(merge, unit, meta)

    monkeypatch.setattr(cache_module.CacheMerge, "_put", counted)
    report = report_file(days, {**GROUPED, "pipeline": {"chunk_size": 40}})
    cache = days / "cache"
    assert assert_same_as_cold(report, days, cache)["computed_rows"] == 1200
    assert len(segments) == 4 and max(segments) > 1, segments
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200
    write_day(days / "data", 4)
    assert assert_same_as_cold(report, days, cache)["computed_rows"] == 300


def test_keys_out_of_order_inside_a_unit_fail_a_cached_run_as_a_cold_one(days):
    """With source.sorted, a key that goes back within one file fails the run, with
    the cache as without it, naming the same row."""
    import pyarrow.parquet as pq

    from ashstream.errors import AshstreamError

    day = pq.read_table(days / "data" / "d002.parquet")  # 2024-01-27, 300 rows
    back = pa.array([dt.date(2024, 1, 28)] * 150 + [dt.date(2024, 1, 27)] * 150)
    day = day.set_column(day.schema.get_field_index("day"), "day", back)
    pq.write_table(day, days / "data" / "d002.parquet", row_group_size=100)
    report = report_file(days, {**GROUPED, "pipeline": {"chunk_size": 40}})
    with pytest.raises(AshstreamError) as cold:
        run(report, days / "cold.typ")
    with pytest.raises(AshstreamError) as cached:
        run(report, days / "cached.typ", days / "cache")
    assert "sorted" in str(cold.value)
    assert str(cached.value) == str(cold.value)
    assert not (days / "cached.typ").exists()


def test_on_a_pool_and_any_chunk_size(days, pools):
    report, cache = report_file(days, GROUPED), days / "cache"
    cold = days / "cold.typ"
    run(report, cold)
    run_report(report, output=days / "a.typ", cache=cache, workers=2, chunk_size=7)
    write_day(days / "data", 4)
    run(report, cold)
    summary = run_report(report, output=days / "b.typ", cache=cache, workers=2, chunk_size=1000)
    assert (days / "b.typ").read_bytes() == cold.read_bytes()
    assert summary.cache["reused_rows"] == 1200


CHANGES = st.lists(
    st.tuples(st.sampled_from(["append", "rewrite", "delete", "touch"]), st.integers(0, 7)),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(changes=CHANGES, position_free=st.booleans())
def test_after_any_changes_a_cached_run_is_a_cold_run(tmp_path_factory, changes, position_free):
    folder = tmp_path_factory.mktemp("days")
    (folder / "data").mkdir()
    for day in range(3):
        write_day(folder / "data", day, rows=120)
    spec = dict(GROUPED)
    if position_free:  # no running value or raw series: any unit is reused alone
        spec = {**GROUPED, "variables": GROUPED["variables"][:1] + GROUPED["variables"][3:]}
        spec["charts"] = GROUPED["charts"][:1]
    report, cache = report_file(folder, spec), folder / "cache"
    run(report, folder / "warm.typ", cache)
    for step, (change, n) in enumerate(changes):
        files = sorted((folder / "data").glob("*.parquet"))
        if change == "append":
            write_day(folder / "data", 10 + step, rows=50 + n * 20)
        elif change == "rewrite":
            write_day(folder / "data", int(files[n % len(files)].stem[1:]), rows=90, seed=step + 1)
        elif change == "delete" and len(files) > 1:
            files[n % len(files)].unlink()
        elif change == "touch":
            os.utime(files[n % len(files)])
        assert_same_as_cold(report, folder, cache)


def test_a_report_that_sorts_across_files_is_cached_whole(days):
    spec = {**GROUPED, "source": {"sorted": False}, "groups": GROUPED["groups"][::-1]}
    report, cache = report_file(days, spec), days / "cache"
    assert assert_same_as_cold(report, days, cache)["mode"] == "whole"
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200
    write_day(days / "data", 1, seed=5)
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 0


def test_a_duckdb_file_that_changes(tmp_path):
    database = tmp_path / "shop.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE t AS SELECT i AS id, i * 2 AS v FROM range(500) t(i)")
    spec = {
        "name": "db",
        "source": {"duckdb": {"database": "shop.duckdb", "query": "SELECT * FROM t"}},
        "variables": [{"name": "total", "function": "sum", "field": "v"}],
    }
    report = tmp_path / "r.yaml"
    report.write_text(yaml.safe_dump(spec))
    cache = tmp_path / "cache"
    assert assert_same_as_cold(report, tmp_path, cache)["mode"] == "whole"
    assert assert_same_as_cold(report, tmp_path, cache)["reused_rows"] == 500
    time.sleep(0.01)
    with duckdb.connect(str(database)) as con:
        con.execute("INSERT INTO t VALUES (1000, 1)")
    assert assert_same_as_cold(report, tmp_path, cache) == {
        "reused_rows": 0,
        "computed_rows": 501,
        "mode": "whole",
    }


# ------------------------------------------------------------------ what shapes it


def test_the_fingerprint_changes_with_what_shapes_output_only(days):
    base = load_report(report_file(days, GROUPED))
    same_output = [
        {"pipeline": {"workers": 3}},
        {"pipeline": {"chunk_size": 17}},
        {"pipeline": {"memory_limit": "3GiB"}},
        {"output": {"typst": "elsewhere.typ", "pdf_max_rows": 10}},
    ]
    for extra in same_output:
        other = load_report(report_file(days, {**GROUPED, **extra}, "o.yaml"))
        assert fingerprint(other) == fingerprint(base), extra
    shaping = [
        {"source": {"sorted": True, "where": "qty > 1"}},
        {"fields": ["id", "day", "amount", "qty", "note"], "charts": GROUPED["charts"][:1]},
        {
            "fields": [
                {"name": "x", "expr": "qty + 1"},
                "day",
                "amount",
                "qty",
                "note",
                "ratio",
                "id",
            ]
        },
        {"pipeline": {"timezone": "Asia/Tokyo"}},
        {"groups": [GROUPED["groups"][0], {"name": "day", "expr": "day + 0"}]},
        {"variables": GROUPED["variables"][:2]},
        {"charts": GROUPED["charts"][1:]},
        {"charts": [{**GROUPED["charts"][0], "points": 21}]},
    ]
    for extra in shaping:
        other = load_report(report_file(days, {**GROUPED, **extra}, "o.yaml"))
        assert fingerprint(other) != fingerprint(base), extra
    with_param = {**GROUPED, "params": {"low": {"type": "int", "default": 1}}}
    with_param["source"] = {"sorted": True, "where": "qty > $low"}
    one = load_report(report_file(days, with_param, "p.yaml"))
    two = load_report(report_file(days, with_param, "p.yaml"), {"low": "2"})
    assert fingerprint(one) != fingerprint(two)


# ---------------------------------------------------------------- bad entries


def text_place(entry: Path) -> tuple[Path, int, int]:
    """Where an entry's text lies: its text file, offset and bytes."""
    fields = cache_module._HEADER.unpack(entry.read_bytes()[:HEADER_BYTES])
    return entry.parent.parent / "texts" / fields[2].hex(), fields[3], fields[4]


def flip(path: Path, offset: int, bit: int) -> None:
    """Flip a bit of a file in place (a text file is a module too: a hard link)."""
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ bit]))


@pytest.mark.parametrize(
    "damage", ["truncate", "flip-text", "flip-meta", "garbage", "version", "truncate-text"]
)
def test_a_damaged_entry_is_logged_once_and_recomputed(days, damage, caplog):
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "warm.typ", cache)
    entries = sorted((cache / "entries").iterdir())
    assert len(entries) == 4
    victim = entries[1]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip-text":
        text, offset, length = text_place(victim)
        flip(text, offset + length // 2, 0x04)
    elif damage == "truncate-text":  # of the unit last in its text, so only it is hit
        victim = max(entries, key=lambda e: text_place(e)[1])
        text, offset, length = text_place(victim)
        os.truncate(text, offset + length - 1)
    elif damage == "flip-meta":
        data[-3] ^= 0x01
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data[8] += 1  # the format version, in the header (its checksum then fails too)
    if damage.endswith("text"):
        assert (days / "warm.typ").stat().st_ino == text.stat().st_ino  # the module itself
    else:
        victim.write_bytes(bytes(data))
    facts = assert_same_as_cold(report, days, cache)
    assert facts["computed_rows"] >= 300
    warnings = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warnings) == 1 and victim.name in warnings[0].getMessage()
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200


def test_texts_found_damaged_as_they_are_copied_restart_the_run_once(days, caplog):
    """Texts are checked while the run goes on: the first bad one found restarts it,
    and the second start checks every entry before it plans."""
    position_free = {**GROUPED, "variables": GROUPED["variables"][:1] + GROUPED["variables"][3:]}
    position_free["charts"] = GROUPED["charts"][:1]  # every unit is looked up alone
    report, cache = report_file(days, position_free), days / "cache"
    run(report, days / "warm.typ", cache)
    entries = sorted((cache / "entries").iterdir())
    for victim in (entries[1], entries[3]):
        text, offset, _ = text_place(victim)
        flip(text, offset + 5, 0x20)
    caplog.set_level("INFO", logger="ashstream")
    facts = assert_same_as_cold(report, days, cache)
    assert facts["computed_rows"] >= 600
    unusable = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(unusable) == 2
    assert len([r for r in caplog.records if "running again" in r.getMessage()]) == 1
    assert not list((cache / "tmp").iterdir())
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200


@pytest.mark.parametrize("damaged", [False, True])
def test_a_text_written_on_is_checked_all_the_same(days, damaged, caplog):
    """A run that writes on in the file its reused texts lie in (the cache's alone, as
    a killed run leaves it) copies none of them, yet a damaged one restarts the run."""
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "a.typ", cache)
    (days / "a.typ").unlink()
    (text,) = cache_files(cache)["texts"]
    write_day(days / "data", 4)
    if damaged:
        entry = next(e for e in (cache / "entries").iterdir() if text_place(e)[2])
        _, offset, _ = text_place(entry)
        flip(text, offset + 5, 0x20)
    caplog.set_level("INFO", logger="ashstream")
    facts = run(report, days / "b.typ", cache)["cache"]
    run(report, days / "cold.typ")
    assert (days / "b.typ").read_bytes() == (days / "cold.typ").read_bytes()
    restarts = [r for r in caplog.records if "running again" in r.getMessage()]
    assert len(restarts) == int(damaged)
    if not damaged:  # the old text is the module, written on
        assert (days / "b.typ").stat().st_ino == text.stat().st_ino
        assert facts["computed_rows"] == 300
    else:
        assert facts["computed_rows"] > 300


def test_no_check_thread_outlives_a_run_and_a_replaced_entry_is_not_removed(days):
    report, cache = report_file(days, PLAIN), days / "cache"
    run(report, days / "warm.typ", cache)
    assert run(report, days / "again.typ", cache)["cache"]["reused_rows"] == 1200
    assert not [t for t in threading.enumerate() if t.name.startswith("ashstream-check")]
    store = CacheStore(cache).open()
    path = sorted((cache / "entries").iterdir())[0]
    before = os.stat(path)
    replacement = path.with_suffix(".new")
    replacement.write_bytes(path.read_bytes())  # another run's rename of the same entry
    os.replace(replacement, path)
    store.discard(b"k", path, ValueError("bad"), (before.st_dev, before.st_ino))
    assert path.exists()


class _Opaque:
    """A state the cache's codec does not know."""

    def __init__(self, n: int = 0) -> None:
        self.n = n


class OpaqueCount(Aggregate):
    def init(self) -> _Opaque:
        return _Opaque()

    def update(self, state: _Opaque, values: pa.Array) -> _Opaque:
        return _Opaque(state.n + len(values) - values.null_count)

    def merge(self, left: _Opaque, right: _Opaque) -> _Opaque:
        return _Opaque(left.n + right.n)

    def finalize(self, state: _Opaque) -> int:
        return state.n


def test_a_state_the_codec_refuses_leaves_its_units_uncached(days, caplog):
    spec = {"variables": [{"name": "n", "function": "opaque_count", "field": "note"}]}
    report = load_report(report_file(days, spec), aggregates={"opaque_count": OpaqueCount})
    cold, cache = days / "cold.typ", days / "cache"
    run_report(report, output=cold, cache=False, inline_rows=10**9)
    for name in ("a.typ", "b.typ"):
        summary = run_report(report, output=days / name, cache=cache, inline_rows=10**9)
        assert (days / name).read_bytes() == cold.read_bytes()
        assert summary.cache["computed_rows"] == 1200 and summary.totals["n"] == 960
    assert not list((cache / "entries").iterdir())
    assert any("is not cached" in r.getMessage() for r in caplog.records)


def test_the_folder_is_private_and_refused_when_not(tmp_path):
    store = CacheStore(tmp_path / "c").open()
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700
    os.chmod(store.root, 0o777)
    from ashstream.errors import SettingsError

    with pytest.raises(SettingsError, match="others may write"):
        CacheStore(tmp_path / "c").open()


# -------------------------------------------------------------- bounds, commands


def cache_files(cache: Path) -> dict[str, list[Path]]:
    return {part: sorted((cache / part).iterdir()) for part in ("entries", "texts")}


def test_eviction_removes_the_least_recently_used_texts_first(days):
    plain, grouped = report_file(days, PLAIN), report_file(days, GROUPED, name="g.yaml")
    cache = days / "cache"
    run(grouped, days / "g.typ", cache)
    first = cache_files(cache)
    run(plain, days / "a.typ", cache)
    store = CacheStore(cache).open()
    plain_bytes = store.size_bytes() - sum(
        p.stat().st_size for p in first["entries"] + first["texts"]
    )
    summary = run(plain, days / "b.typ", cache, cache_max_size=plain_bytes)
    assert summary["cache"]["reused_rows"] == 1200
    assert store.size_bytes() <= plain_bytes
    left = cache_files(cache)
    assert len(left["entries"]) == 4 and len(left["texts"]) == 1
    assert not set(first["entries"] + first["texts"]) & set(left["entries"] + left["texts"])
    assert run(plain, days / "c.typ", cache)["cache"]["reused_rows"] == 1200
    assert run(grouped, days / "d.typ", cache)["cache"]["computed_rows"] == 1200


def test_eviction_passes_over_a_text_a_run_holds(days):
    """A text that a run still holds (its shared lock, as a run reading it takes) is in
    use: past the bound the others go, it stays with its entries, and it goes once
    it is free."""
    plain, grouped = report_file(days, PLAIN), report_file(days, GROUPED, name="g.yaml")
    cache = days / "cache"
    run(grouped, days / "g.typ", cache)  # the least recently used: first out
    (held,) = cache_files(cache)["texts"]
    grouped_entries = cache_files(cache)["entries"]
    run(plain, days / "a.typ", cache)
    store = CacheStore(cache, max_size_bytes=1).open()
    with open(held, "rb") as reading:
        fcntl.flock(reading.fileno(), fcntl.LOCK_SH)
        assert store.tidy() > 0
        assert cache_files(cache) == {"entries": grouped_entries, "texts": [held]}
    assert run(grouped, days / "g2.typ", cache)["cache"]["reused_rows"] == 1200
    store.tidy()
    assert cache_files(cache) == {"entries": [], "texts": []}


def test_reports_alike_but_for_their_files_keep_each_others_entries(days):
    """A run removes the entries of its own report that it did not use, never those of
    a report with the same options over other files, sharing the cache."""
    other = days / "other"
    (other / "data").mkdir(parents=True)
    for day in range(10, 13):
        write_day(other / "data", day)
    cache = days / "cache"
    mine, theirs = report_file(days, GROUPED), report_file(other, GROUPED)
    run(mine, days / "a.typ", cache)
    run(theirs, other / "a.typ", cache)
    assert run(mine, days / "b.typ", cache)["cache"]["computed_rows"] == 0
    assert run(theirs, other / "b.typ", cache)["cache"]["computed_rows"] == 0


def test_a_run_keeps_one_text_and_a_rerun_links_the_module(days):
    """A cold run's module is the cache's text (one write); a re-run over the same
    data links it as its module (none); one that must copy it (into another output,
    or over grown data) points the entries at its module, and the cache keeps that
    text alone."""
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "a.typ", cache)
    (text,) = cache_files(cache)["texts"]
    assert text.stat().st_ino == (days / "a.typ").stat().st_ino
    assert run(report, days / "a.typ", cache)["cache"]["computed_rows"] == 0
    assert (days / "a.typ").stat().st_ino == text.stat().st_ino  # dated now, not copied
    assert run(report, days / "b.typ", cache)["cache"]["computed_rows"] == 0
    (text,) = cache_files(cache)["texts"]
    assert (days / "b.typ").stat().st_ino == text.stat().st_ino
    assert (days / "a.typ").stat().st_ino != text.stat().st_ino  # outputs share no file
    assert (days / "b.typ").read_bytes() == (days / "a.typ").read_bytes()
    (days / "b.typ").unlink()  # the cache's alone: it is linked again
    assert run(report, days / "c.typ", cache)["cache"]["computed_rows"] == 0
    assert (days / "c.typ").stat().st_ino == text.stat().st_ino
    assert cache_files(cache)["texts"] == [text]
    write_day(days / "data", 4)
    facts = assert_same_as_cold(report, days, cache)
    assert facts["reused_rows"] == 1200 and facts["computed_rows"] == 300
    (grown,) = cache_files(cache)["texts"]
    assert grown.stat().st_ino == (days / "cached.typ").stat().st_ino
    assert {text_place(e)[0] for e in cache_files(cache)["entries"]} == {grown}
    again = run(report, days / "cached.typ", cache)  # over itself: the same file, dated now
    assert again["cache"]["computed_rows"] == 0
    assert (days / "cached.typ").stat().st_ino == grown.stat().st_ino
    assert not [p for p in days.iterdir() if p.name.startswith(".cached.typ.")]


def test_entries_no_run_will_use_go_with_the_modules_they_kept(days):
    """A file rewritten or deleted leaves its report's entries of it behind (and of
    the units after it, whose first rows moved); the run that read the report whole
    removes them, so that the earlier module they point into goes too. Another
    report's entries stay."""
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report_file(days, PLAIN, name="p.yaml"), days / "p.typ", cache)
    theirs = cache_files(cache)
    run(report, days / "a.typ", cache)
    write_day(days / "data", 3, seed=1)
    assert assert_same_as_cold(report, days, cache)["computed_rows"] == 300
    files = cache_files(cache)
    assert len(files["entries"]) == 8 and set(theirs["entries"]) < set(files["entries"])
    assert files["texts"] == sorted([*theirs["texts"], days / "cache" / "texts" / text_of(days)])
    (days / "data" / "d001.parquet").unlink()
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 300  # the prefix
    files = cache_files(cache)
    assert len(files["entries"]) == 7 and set(theirs["entries"]) < set(files["entries"])
    assert files["texts"] == sorted([*theirs["texts"], days / "cache" / "texts" / text_of(days)])


@pytest.mark.parametrize("used", [False, True], ids=["unused", "used-meanwhile"])
def test_an_entry_another_run_used_meanwhile_stays(days, used):
    """The run that read a report whole removes its entries of a file gone since, but
    not one that another run wrote or reused after this one began (its mtime): two
    runs at once over a dataset, one seeing a day the other does not, keep each
    other's entries."""
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "a.typ", cache)
    before = set(os.listdir(cache / "entries"))
    day = write_day(days / "data", 4)
    run(report, days / "a.typ", cache)
    (added,) = set(os.listdir(cache / "entries")) - before
    written = time.time() - 60  # before the next run: in the clock's grain or not
    os.utime(cache / "entries" / added, (written, written))
    day.rename(days / "away.parquet")  # as it was: its identity stays

    def other_run(step) -> None:  # as one over the five days would, before this one tidies
        if used and step.stage is RunStage.STREAM_ENDED:
            os.utime(cache / "entries" / added)

    assert run(report, days / "a.typ", cache, progress=other_run)["cache"]["reused_rows"] == 1200
    assert (added in os.listdir(cache / "entries")) is used
    (days / "away.parquet").rename(day)
    assert assert_same_as_cold(report, days, cache)["computed_rows"] == (0 if used else 300)


def text_of(days: Path) -> str:
    """The name in the cache of the text that is ``days/cached.typ``."""
    inode = (days / "cached.typ").stat().st_ino
    return next(p.name for p in (days / "cache" / "texts").iterdir() if p.stat().st_ino == inode)


def test_a_cache_on_another_file_system_keeps_its_own_text(days, monkeypatch):
    """Where the module cannot be linked (EXDEV), the cache writes the texts itself."""
    real_link = os.link

    def no_link(src, dst, *args, **kwargs):
        if str(src).startswith("/proc/self/fd/"):
            raise OSError(18, "Invalid cross-device link")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_link)
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "a.typ", cache)
    (text,) = cache_files(cache)["texts"]
    assert text.stat().st_ino != (days / "a.typ").stat().st_ino
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200
    write_day(days / "data", 4)
    assert assert_same_as_cold(report, days, cache)["computed_rows"] == 300
    assert len(cache_files(cache)["texts"]) == 2


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 4097, 10_000])
@pytest.mark.parametrize("length", [0, 1, 5000, 40_000])
def test_a_copied_range_is_its_bytes_with_shareable_blocks_after_the_first(
    tmp_path, monkeypatch, offset, length
):
    """Every kernel copy after the first starts on a block boundary of the source: a
    file system that shares blocks (XFS, Btrfs) then shares them rather than copy."""
    from ashstream import sinks

    monkeypatch.setattr(sinks, "COPY_STEP", 8192)
    data = os.urandom(60_000)
    (tmp_path / "source").write_bytes(data)
    starts = []
    real_copy = os.copy_file_range

    def seen(src, dst, count, offset_src=None, *args):
        starts.append(offset_src)
        return real_copy(src, dst, count, offset_src, *args)

    monkeypatch.setattr(os, "copy_file_range", seen)
    with open(tmp_path / "source", "rb") as source, open(tmp_path / "target", "wb") as target:
        target.write(data[:offset])
        target.flush()
        block = os.fstat(target.fileno()).st_blksize
        sinks._copy_range(source.fileno(), offset, length, target.fileno())
    assert (tmp_path / "target").read_bytes() == data[: offset + length]
    assert all(start % block == 0 for start in starts[1:]), starts


def test_cache_list_and_clear(days):
    from click.testing import CliRunner

    from ashstream.cli import main

    report, cache = report_file(days, PLAIN), days / "cache"
    run(report, days / "a.typ", cache)
    listed = CliRunner().invoke(main, ["cache", "list", "--dir", str(cache), "--json"])
    assert listed.exit_code == 0
    assert len(json.loads(listed.output)["entries"]) == 4
    cleared = CliRunner().invoke(main, ["cache", "clear", "--dir", str(cache)])
    assert cleared.exit_code == 0 and "Removed 4 entries" in cleared.output
    assert not list((cache / "entries").iterdir())


# ------------------------------------------------------ processes: kill, share


def ashstream(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ashstream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    )


def test_a_continued_module_ends_where_its_rows_end_before_what_was_past_them(days):
    """A run continues the cache's text of a module no one has any more (as a killed
    run's), writing over what lay past its last reused unit: where that was longer
    than the rest of the module (a killed run's half unit, an earlier trailer), the
    module is cut at its own end, byte for byte a cold run's."""
    report, cache = report_file(days, GROUPED), days / "cache"
    run(report, days / "a.typ", cache)
    (text,) = cache_files(cache)["texts"]
    (days / "a.typ").unlink()  # the cache's alone now
    with open(text, "ab") as file:
        file.write(b"x" * 2**20)  # past the units: no entry's, longer than what follows
    write_day(days / "data", 4)
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 1200
    assert (days / "cached.typ").stat().st_ino == text.stat().st_ino  # continued


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("after_entries", [1, 5])
def test_a_killed_run_resumes_from_its_finished_units(tmp_path, after_entries):
    (tmp_path / "data").mkdir()
    for day in range(12):
        write_day(tmp_path / "data", day, rows=4000)
    report, cache = report_file(tmp_path, GROUPED), tmp_path / "cache"
    killed = ashstream(
        "run",
        str(report),
        "-o",
        str(tmp_path / "k.typ"),
        "--cache",
        str(cache),
        "--workers",
        "2",
        "-q",
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and killed.poll() is None:
        if len(list((cache / "entries").glob("*"))) >= after_entries:
            break
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()  # and close its pipes
    done = len(list((cache / "entries").iterdir()))
    assert done >= after_entries
    assert not (tmp_path / "k.typ").exists()
    (killed_text,) = (cache / "texts").iterdir()
    run(report, tmp_path / "cold.typ")
    # on a pool, as the killed run: starting one removes the killed pool's segments
    summary = run_report(report, output=tmp_path / "k.typ", cache=cache, workers=2)
    assert (tmp_path / "k.typ").read_bytes() == (tmp_path / "cold.typ").read_bytes()
    # the killed run's module, written on from its last whole unit: nothing copied
    assert (tmp_path / "k.typ").stat().st_ino == killed_text.stat().st_ino
    assert summary.cache["reused_rows"] == done * 4000
    assert assert_same_as_cold(report, tmp_path, cache)["reused_rows"] == 12 * 4000
    summary = run_report(report, output=tmp_path / "cached.typ", cache=cache, workers=2)
    assert (tmp_path / "cached.typ").read_bytes() == (tmp_path / "cold.typ").read_bytes()
    assert summary.cache["reused_rows"] == 12 * 4000
    assert not list((cache / "tmp").iterdir())  # the killed run's half entry is gone


@pytest.mark.process
@pytest.mark.slow
def test_two_runs_sharing_a_cache_both_finish_right(days):
    for day in range(4, 10):
        write_day(days / "data", day, rows=3000)
    report, cache = report_file(days, GROUPED), days / "cache"
    cold = days / "cold.typ"
    run(report, cold)
    runs = [
        ashstream("run", str(report), "-o", str(days / f"{i}.typ"), "--cache", str(cache), "--json")
        for i in range(2)
    ]
    for process in runs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert json.loads(out)["rows"] == 1200 + 6 * 3000
    for i in range(2):
        assert (days / f"{i}.typ").read_bytes() == cold.read_bytes()
    assert assert_same_as_cold(report, days, cache)["reused_rows"] == 19200
