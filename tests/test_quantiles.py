"""Medians, quantiles, top values and aggregates users write, against DuckDB.

The aggregates alone first: any cut of a column into batches, reduced and merged in
order, must give DuckDB's ``quantile_disc``/``quantile_cont`` exactly (the sketch: within
its relative error of ``quantile_disc``), and ``top`` DuckDB's ``GROUP BY value ORDER BY
count DESC, value``, with every cut giving the same bytes. Then whole streams: the same
module for every chunk size, worker count and engine, checked against DuckDB.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ashstream import (
    InlineStream,
    ReportError,
    ResourceError,
    StreamPool,
    load_report,
    run_report,
)
from ashstream.analysis.aggregate import Analysis, Collector, analyse_batch
from ashstream.analysis.frequent import Top
from ashstream.analysis.quantiles import ExactQuantile, QuantileSketch
from ashstream.encode import encode_value
from tests.conftest import assert_one_line, write_report
from tests.typst_roundtrip import evaluate_module

pytestmark = pytest.mark.timeout(600)

GROUPS = 3
INT64 = st.integers(-(2**63), 2**63 - 1)
SPECIAL = [0.0, -0.0, math.nan, math.inf, -math.inf, 1.5, -1.5]
COLUMNS = {
    "int": (pa.int64(), st.one_of(INT64, st.integers(-3, 3))),
    "uint": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "small": (pa.int16(), st.integers(-4, 4)),
    "float": (pa.float64(), st.one_of(st.floats(), st.sampled_from(SPECIAL))),
    "decimal": (pa.decimal128(10, 2), st.integers(-(10**10) + 1, 10**10 - 1)),
    "wide": (pa.decimal128(38, 3), st.integers(-(10**38) + 1, 10**38 - 1)),
    "date": (pa.date32(), st.dates(dt.date(1, 1, 1), dt.date(9999, 12, 31))),
    "zoned": (
        pa.timestamp("us", tz="America/New_York"),
        st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)),
    ),
}
QS = st.lists(
    st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.5, 1.0, 0.136, 0.3, 0.95, 0.99])),
    min_size=1,
    max_size=4,
)


def column_values(kind: str, draw_values: list) -> pa.Array:
    t, _ = COLUMNS[kind]
    if pa.types.is_decimal(t):
        wide = decimal.Context(prec=60)
        draw_values = [
            None if v is None else decimal.Decimal(v).scaleb(-t.scale, wide) for v in draw_values
        ]
    return pa.array(draw_values, t)


@st.composite
def grouped_columns(draw, kinds=tuple(COLUMNS)):
    kind = draw(st.sampled_from(kinds))
    values = draw(st.lists(st.one_of(st.none(), COLUMNS[kind][1]), max_size=60))
    ids = draw(st.lists(st.integers(0, GROUPS - 1), min_size=len(values), max_size=len(values)))
    cuts = sorted(draw(st.lists(st.integers(0, len(values)), max_size=6)))
    return kind, column_values(kind, values), np.array(ids, dtype=np.int64), cuts


def reduced(aggregate, values: pa.Array, ids: np.ndarray, cuts: list[int]) -> list:
    """Each group's result, the column cut into batches at ``cuts``."""
    states = [aggregate.init() for _ in range(GROUPS)]
    for start, end in zip([0, *cuts], [*cuts, len(values)], strict=True):
        batch = aggregate.reduce(values.slice(start, end - start), ids[start:end], GROUPS)
        states = [aggregate.merge(a, b) for a, b in zip(states, batch, strict=True)]
    return [aggregate.finalize(s) for s in states]


def oracle(values: pa.Array, ids: np.ndarray, expression: str) -> list:
    """DuckDB's ``expression`` over ``v`` per group 0..GROUPS-1."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    t = pa.table({"g": pa.array(ids, pa.int64()), "v": values})
    con.register("t", t)
    found = dict(con.execute(f"SELECT g, {expression} FROM t GROUP BY g").fetchall())
    return [found.get(g) for g in range(GROUPS)]


def same(ours, theirs) -> bool:
    """Equal values (NaN equal to NaN, 0.0 to -0.0: DuckDB's order of the two is its own)."""
    if isinstance(ours, list) or isinstance(theirs, list):
        return (
            isinstance(ours, list)
            and isinstance(theirs, list)
            and len(ours) == len(theirs)
            and all(same(a, b) for a, b in zip(ours, theirs, strict=True))
        )
    if isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours):
        return math.isnan(theirs)
    return ours == theirs and type(ours) is type(theirs)


def literal(value) -> str:
    return encode_value(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column=grouped_columns(), qs=QS, interpolate=st.sampled_from([None, False, True]))
def test_exact_quantiles_are_duckdbs_for_any_cut_of_the_batches(column, qs, interpolate):
    kind, values, ids, cuts = column
    numbers = kind in ("int", "uint", "small", "float")
    if interpolate and not numbers:
        assert ExactQuantile(tuple(qs), True).check(values.type) is not None
        return
    aggregate = ExactQuantile(tuple(qs), interpolate)
    assert aggregate.check(values.type) is None
    ours = reduced(aggregate, values, ids, cuts)
    assert [literal(r) for r in ours] == [literal(r) for r in reduced(aggregate, values, ids, [])]
    cont = interpolate if interpolate is not None else kind == "float"
    listed = ", ".join(repr(q) for q in qs)
    theirs = oracle(values, ids, f"quantile_{'cont' if cont else 'disc'}(v, [{listed}])")
    if kind == "uint" and cont:  # DuckDB interpolates UBIGINT in its own type, not double
        theirs = oracle(values, ids, f"quantile_cont(v::DOUBLE, [{listed}])")
    for g in range(GROUPS):
        assert same(ours[g], theirs[g]), (g, ours[g], theirs[g])


@pytest.mark.parametrize("kind", ["int", "float", "wide"])
def test_exact_quantiles_over_hundreds_of_batches_are_duckdbs(kind):
    """Past RUNS_KEPT runs a group's runs are joined: the result stays DuckDB's."""
    rng = np.random.default_rng(7)
    draws = {
        "int": lambda: int(rng.integers(-50, 50)),
        "float": lambda: float(rng.choice([rng.normal(), -0.0, 0.0, math.nan])),
        "wide": lambda: int(rng.integers(-(10**15), 10**15)) * 10**20,
    }
    values = column_values(kind, [None if i % 11 == 0 else draws[kind]() for i in range(900)])
    ids = rng.integers(0, GROUPS, len(values))
    cuts = list(range(2, len(values), 2))  # 449 batches
    aggregate = ExactQuantile((0.0, 0.25, 0.5, 0.9, 1.0), None)
    ours = reduced(aggregate, values, ids, cuts)
    cont = kind == "float"
    theirs = oracle(
        values, ids, f"quantile_{'cont' if cont else 'disc'}(v, [0, 0.25, 0.5, 0.9, 1])"
    )
    for g in range(GROUPS):
        assert same(ours[g], theirs[g]), (g, ours[g], theirs[g])


def test_disc_takes_duckdbs_rank_where_rounding_moves_it():
    """0.136 * 875 is 118.99999999999999: ceil gives rank 119, DuckDB's formula 118."""
    values = pa.array(np.arange(875, dtype=np.int64))
    (ours,) = reduced(ExactQuantile(0.136), values, np.zeros(875, dtype=np.int64), [])[:1]
    sql = "SELECT quantile_disc(x, 0.136) FROM range(875) t(x)"
    assert ours == 118 == duckdb.connect().execute(sql).fetchone()[0]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    column=grouped_columns(("int", "small", "float", "decimal")),
    qs=QS,
    alpha=st.sampled_from([0.001, 0.01, 0.05]),
)
def test_sketched_quantiles_are_within_their_relative_error(column, qs, alpha):
    kind, values, ids, cuts = column
    if kind == "float":  # the guarantee's range: within 2**64 of the largest magnitude
        values = pa.array(
            [
                v if v is None or not math.isfinite(v) or v == 0 or 1e-9 < abs(v) < 1e9 else 1.0
                for v in values.to_pylist()
            ],
            pa.float64(),
        )
    aggregate = QuantileSketch(tuple(qs), alpha)
    ours = reduced(aggregate, values, ids, cuts)
    assert [literal(r) for r in ours] == [literal(r) for r in reduced(aggregate, values, ids, [])]
    listed = ", ".join(repr(q) for q in qs)
    theirs = oracle(values, ids, f"quantile_disc(v::DOUBLE, [{listed}])")
    for g in range(GROUPS):
        if theirs[g] is None:
            assert ours[g] is None
            continue
        for a, b in zip(ours[g], theirs[g], strict=True):
            if not math.isfinite(b) or b == 0:
                assert same(a, b), (a, b)
            else:
                assert abs(a - b) <= alpha * abs(b) * (1 + 1e-9), (a, b, alpha)


def test_the_sketch_keeps_its_bound_on_a_million_spread_values():
    rng = np.random.default_rng(7)
    values = pa.array(np.concatenate([rng.lognormal(0, 8, 10**6), -rng.lognormal(0, 8, 10**5)]))
    ids = np.zeros(len(values), dtype=np.int64)
    aggregate = QuantileSketch(0.5, 0.01)
    state = aggregate.reduce(values, ids, 1)[0]
    assert len(state[0]) <= 2 * aggregate.buckets + 3
    assert state[0].nbytes + state[1].nbytes <= 72 * 1024


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column=grouped_columns(("small", "float", "decimal", "date", "zoned")), n=st.integers(1, 4))
def test_top_is_duckdbs_group_by_value_order_by_count(column, n):
    _, values, ids, cuts = column
    ours = reduced(Top(n), values, ids, cuts)
    assert [literal(r) for r in ours] == [literal(r) for r in reduced(Top(n), values, ids, [])]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("t", pa.table({"g": pa.array(ids, pa.int64()), "v": values}))
    rows = con.execute(
        "SELECT g, v, count(*) AS c FROM t WHERE v IS NOT NULL GROUP BY g, v ORDER BY g, c DESC, v"
    ).fetchall()
    for g in range(GROUPS):
        theirs = [{"value": v, "count": c} for gg, v, c in rows if gg == g][:n]
        assert len(ours[g]) == len(theirs)
        for a, b in zip(ours[g], theirs, strict=True):
            assert a["count"] == b["count"] and same(a["value"], b["value"]), (ours[g], theirs)


# ------------------------------------------------------------------------ streams

ROWS = 600
SOURCE_SQL = f"""
SELECT
    i AS id,
    ['north', 'south', 'east'][1 + (i // 100 % 3)::INT] AS region,
    i // 250 AS block,
    CASE WHEN i % 11 = 0 THEN NULL ELSE ((i * 7919) % 10007 / 100.0)::DECIMAL(12, 2) END AS amount,
    CASE WHEN i % 31 = 0 THEN 'NaN'::DOUBLE WHEN i % 17 = 0 THEN NULL
         WHEN i % 19 = 0 THEN -0.0 WHEN i % 23 = 0 THEN 0.0
         ELSE ((i * 104729) % 1000) / 7.0 - 40 END AS price,
    (i % 7)::INTEGER AS qty,
    DATE '2020-01-01' + (i % 40)::INTEGER AS day,
    TIMESTAMPTZ '2020-01-01 00:00:00+00' + to_microseconds(i * 77777777) AS at
FROM range({ROWS}) t(i)
"""
STREAM_SPEC = {
    "name": "quantiles",
    "source": {"parquet": "data.parquet", "order_by": "id"},
    "groups": [{"name": "region", "field": "region"}, {"name": "block", "field": "block"}],
    "variables": [
        {"name": "median_amount", "function": "median", "field": "amount", "reset": "block"},
        {
            "name": "price_q",
            "function": "quantile",
            "q": [0.1, 0.5, 0.95],
            "field": "price",
            "reset": "region",
        },
        {
            "name": "p95_sketch",
            "function": "quantile",
            "q": 0.95,
            "method": "sketch",
            "field": "price",
            "reset": "region",
        },
        {"name": "median_day", "function": "median", "field": "day", "reset": "region"},
        {"name": "median_at", "function": "median", "field": "at"},
        {"name": "qty_cont", "function": "median", "field": "qty", "interpolate": True},
        {"name": "top_qty", "function": "top", "n": 3, "field": "qty", "reset": "region"},
        {"name": "mode_day", "function": "mode", "field": "day", "reset": "block"},
        {"name": "median_all", "function": "median", "field": "price"},
    ],
    "charts": [
        {
            "name": "median_by_day",
            "x": "day",
            "y": "price",
            "agg": "median",
            "bucket": "auto",
            "points": 10,
        },
        {
            "name": "p90_by_qty",
            "x": "qty",
            "y": "amount",
            "agg": "quantile",
            "q": 0.9,
            "method": "sketch",
            "bucket": 1,
        },
    ],
}


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quantiles")
    table = duckdb.sql(SOURCE_SQL).to_arrow_table()
    pq.write_table(table, root / "data.parquet", row_group_size=97)
    write_report(root, STREAM_SPEC)
    return root


@pytest.fixture(scope="module")
def small_batch_pools():
    pools = {w: StreamPool(w, min_batch_rows=1) for w in (1, 3)}
    for pool in pools.values():
        pool.open()
    yield pools
    for pool in pools.values():
        pool.close()


def stream_result(handle) -> tuple:
    text, groups = b"", []
    for chunk in handle:
        text += chunk.text
        groups += chunk.groups
    summary = handle.summary
    groups += summary.groups
    shown = [(g.level, g.keys, g.first_row, g.last_row, literal(g.variables)) for g in groups]
    return text, shown, literal(summary.totals), literal(summary.charts)


@pytest.mark.process
def test_every_chunking_worker_count_and_engine_gives_the_same_bytes(stream_dir, small_batch_pools):
    report = load_report(stream_dir / "report.yaml")
    want = stream_result(InlineStream(report, 1000))
    for chunk_size in (1, 7, 1000, 65536):
        assert stream_result(InlineStream(report, chunk_size, min_batch_rows=1)) == want
        for pool in small_batch_pools.values():
            assert stream_result(pool.start(report, chunk_size)) == want, (chunk_size, pool.workers)


def test_a_stream_matches_duckdb_per_group(stream_dir):
    report = load_report(stream_dir / "report.yaml")
    _, groups, totals, _ = stream_result(InlineStream(report, 50, min_batch_rows=1))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"CREATE TABLE t AS SELECT * FROM '{stream_dir / 'data.parquet'}'")
    price_q = dict(
        con.execute(
            "SELECT region, quantile_cont(price, [0.1, 0.5, 0.95]) FROM t GROUP BY ALL"
        ).fetchall()
    )
    p95 = dict(
        con.execute("SELECT region, quantile_disc(price, 0.95) FROM t GROUP BY ALL").fetchall()
    )
    counted = con.execute(
        "SELECT region, qty, count(*) FROM t WHERE qty IS NOT NULL GROUP BY ALL "
        "ORDER BY region, count(*) DESC, qty"
    ).fetchall()
    top_qty = {
        r: [{"value": q, "count": c} for rr, q, c in counted if rr == r][:3] for r in price_q
    }
    blocks = {
        (r, b): (m, d)
        for r, b, m, d in con.execute(
            "SELECT region, block, quantile_disc(amount, 0.5), "
            "(SELECT day FROM t u WHERE u.region = t.region AND u.block = t.block "
            " GROUP BY day ORDER BY count(*) DESC, day LIMIT 1) "
            "FROM t GROUP BY ALL"
        ).fetchall()
    }
    seen = 0
    for level, keys, _, _, variables in groups:
        if level == 1:
            (region,) = keys
            assert f'"price_q": {literal(price_q[region])}' in variables
            assert f'"top_qty": {literal(top_qty[region])}' in variables
            sketched = variables.split('"p95_sketch": ')[1].split(",")[0]
            if math.isnan(p95[region]):
                assert sketched == "float.nan"
            else:
                assert abs(float(sketched) - p95[region]) <= 0.01 * abs(p95[region])
        else:
            median, mode = blocks[keys]
            assert f'"median_amount": {literal(median)}' in variables
            assert f'"mode_day": {literal(mode)}' in variables
        seen += 1
    assert seen == len(groups) > 3
    median_at = con.execute('SELECT quantile_disc("at", 0.5) FROM t').fetchone()[0]
    qty_cont = con.execute("SELECT quantile_cont(qty, 0.5) FROM t").fetchone()[0]
    median_all = con.execute("SELECT quantile_cont(price, 0.5) FROM t").fetchone()[0]
    assert f'"median_at": {literal(median_at)}' in totals
    assert f'"qty_cont": {literal(qty_cont)}' in totals
    assert f'"median_all": {literal(median_all)}' in totals


# ------------------------------------------------------------- aggregates users write

REPO = Path(__file__).resolve().parent.parent
CUSTOM_SPEC = {
    "name": "custom",
    "source": {"parquet": "data.parquet", "order_by": "id"},
    "groups": [{"name": "region", "field": "region"}],
    "variables": [
        {
            "name": "weighted_price",
            "function": "weighted_mean",
            "fields": ["price", "qty"],
            "reset": "region",
            "options": {"scale": 2},
        },
        {"name": "weighted_all", "function": "weighted_mean", "fields": ["price", "qty"]},
    ],
}


def ashstream_cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ashstream", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def installed(tmp_path, monkeypatch) -> Path:
    """A distribution whose entry point names ``WeightedMean``, on this process's path
    (and, through PYTHONPATH, a subprocess's): as ``pip install`` of a plugin leaves it."""
    site = tmp_path / "site"
    info = site / "ashstream_example_aggregates-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ashstream-example-aggregates\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[ashstream.aggregates]\nweighted_mean = tests.example_aggregates:WeightedMean\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def weighted_oracle(table_path: Path, scale: float) -> tuple[dict, float]:
    con = duckdb.connect()
    sql = (
        f"SELECT region, sum(price * qty) / sum(qty) FROM '{table_path}' "
        "WHERE price IS NOT NULL AND qty IS NOT NULL AND NOT isnan(price) GROUP BY ALL"
    )
    per_region = {r: m * scale for r, m in con.execute(sql).fetchall()}
    return per_region


@pytest.mark.process
def test_an_installed_aggregate_over_two_fields_runs_on_every_engine(
    stream_dir, installed, small_batch_pools, tmp_path
):
    # NaN prices would make every weighted mean NaN: this report reads the rows without
    table = pq.read_table(stream_dir / "data.parquet")
    price = pa.compute.if_else(pa.compute.is_nan(table["price"]), None, table["price"])
    table = table.set_column(table.schema.get_field_index("price"), "price", price)
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=97)
    path = write_report(tmp_path, CUSTOM_SPEC)
    report = load_report(path)
    from tests.example_aggregates import WeightedMean

    assert report.variables[0].factory is WeightedMean
    want = stream_result(InlineStream(report, 1000))
    for chunk_size in (1, 7, 65536):
        assert stream_result(InlineStream(report, chunk_size, min_batch_rows=1)) == want
        assert stream_result(small_batch_pools[3].start(report, chunk_size)) == want
    theirs = weighted_oracle(tmp_path / "data.parquet", 2)
    groups = want[1]
    assert len(groups) == len(theirs) == 3
    for _, (region,), _, _, variables in groups:
        ours = float(variables.split('"weighted_price": ')[1].rstrip(")"))
        assert ours == pytest.approx(theirs[region], rel=1e-12)

    # the command, in another process that finds the entry point as installed
    env = {**os.environ, "PYTHONPATH": f"{installed}{os.pathsep}{REPO}"}
    out = tmp_path / "out.typ"
    result = ashstream_cli(tmp_path, "run", str(path), "-o", str(out), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    module = out.read_text()
    for _, _, _, _, variables in groups:
        assert variables in module
    inspected = ashstream_cli(tmp_path, "inspect", str(path), env=env)
    assert "weighted_price = weighted_mean(price, qty, scale=2) per region" in " ".join(
        inspected.stdout.split()
    ), inspected.stdout


def test_an_aggregate_passed_from_python(stream_dir, tmp_path):
    from tests.example_aggregates import GeometricMean

    spec = {
        "name": "geo",
        "source": {"parquet": str(stream_dir / "data.parquet"), "order_by": "id"},
        "variables": [{"name": "geo_qty", "function": "geometric_mean", "field": "qty"}],
    }
    path = write_report(tmp_path, spec)
    with pytest.raises(ReportError, match=r"unknown function 'geometric_mean'.*none is installed"):
        load_report(path)
    report = load_report(path, aggregates={"geometric_mean": GeometricMean})
    summary = run_report(report, output=tmp_path / "geo.typ", workers=2)
    theirs = (
        duckdb.connect()
        .execute(f"SELECT exp(avg(ln(qty))) FROM '{stream_dir / 'data.parquet'}' WHERE qty > 0")
        .fetchone()[0]
    )
    assert summary.totals["geo_qty"] == pytest.approx(theirs, rel=1e-12)
    inline = run_report(report, output=tmp_path / "geo2.typ", inline_rows=10**6)
    assert inline.engine == "inline" and inline.totals == summary.totals
    assert (tmp_path / "geo.typ").read_bytes() == (tmp_path / "geo2.typ").read_bytes()


class NotAnAggregate:
    def init(self):
        return 0


def test_a_factory_must_give_an_aggregate_the_workers_can_import(stream_dir, tmp_path):
    spec = {
        "name": "geo",
        "source": {"parquet": str(stream_dir / "data.parquet")},
        "variables": [{"name": "g", "function": "geo", "field": "qty"}],
    }
    path = write_report(tmp_path, spec)
    with pytest.raises(ReportError, match=r"variables\[0\].function: 'geo' gave a NotAnAggregate"):
        load_report(path, aggregates={"geo": NotAnAggregate})
    from tests.example_aggregates import GeometricMean

    local = type("LocalMean", (GeometricMean,), {})
    with pytest.raises(ReportError, match=r"'geo' cannot be sent to the worker processes"):
        load_report(path, aggregates={"geo": local})


def test_an_aggregate_that_refuses_its_options_or_its_field(stream_dir, installed, tmp_path):
    spec = {**CUSTOM_SPEC, "source": {"parquet": str(stream_dir / "data.parquet")}}
    spec["variables"] = [{**CUSTOM_SPEC["variables"][0], "options": {"weight": 1}}]
    with pytest.raises(
        ReportError,
        match=r"variables\[0\].options: the aggregate 'weighted_mean' "
        r"refused them: TypeError: .*unexpected keyword argument 'weight'",
    ):
        load_report(write_report(tmp_path, spec))
    spec["variables"] = [{**CUSTOM_SPEC["variables"][0], "fields": ["price", "region"]}]
    report = load_report(write_report(tmp_path, spec))
    with pytest.raises(ReportError, match=r"variables\[0\].fields: weighted_mean needs two number"):
        run_report(report, output=tmp_path / "x.typ")
    assert not (tmp_path / "x.typ").exists()


# ------------------------------------------------------------------------ memory


def test_a_group_too_large_to_hold_exactly_stops_the_run_and_names_the_variable(tmp_path):
    rows = 300_000
    duckdb.connect().execute(
        f"COPY (SELECT i AS id, random() AS x FROM range({rows}) t(i)) "
        f"TO '{tmp_path / 'big.parquet'}' (FORMAT parquet)"
    )
    spec = {
        "name": "big",
        "source": {"parquet": "big.parquet"},
        "variables": [
            {"name": "spread", "function": "quantile", "q": 0.95, "method": "sketch", "field": "x"},
            {"name": "typical", "function": "median", "field": "x"},
        ],
        "pipeline": {"memory_limit": "2MiB", "chunk_size": rows},
    }
    path = write_report(tmp_path, spec)
    out = tmp_path / "big.typ"
    result = ashstream_cli(tmp_path, "run", str(path), "-o", str(out), "--no-progress")
    assert result.returncode == 1, result.stderr
    assert_one_line(result.stderr, "the most: variable 'typical', 2 MiB", "use method: sketch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.parquet", "report.yaml"]
    # the collector's own check, whatever the engine: 1 MiB of exact values is too much
    report = load_report(path)
    analysis = Analysis.of(report)
    collector = Collector(analysis)
    batch = pq.read_table(tmp_path / "big.parquet").combine_chunks().to_batches()[0]
    with pytest.raises(ResourceError, match="the most: variable 'typical', 2 MiB"):
        collector.add(analyse_batch(batch, analysis, 0), 0)


def test_the_built_in_template_prints_quantiles_and_top_values(stream_dir, tmp_path):
    spec = {
        **STREAM_SPEC,
        "source": {"parquet": str(stream_dir / "data.parquet"), "order_by": "id"},
        "output": {"pdf": str(tmp_path / "q.pdf"), "detail": False},
    }
    summary = run_report(load_report(write_report(tmp_path, spec)), output=tmp_path / "q.typ")
    assert summary.totals["median_at"] is not None
    pdf = (tmp_path / "q.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000
    module = (tmp_path / "q.typ").read_text()
    shown = evaluate_module(module, "groups.first().variables.top_qty")
    assert shown[0] == "array" and shown[1][0][0] == "dict"


def test_validate_and_inspect_show_the_functions_and_their_options(stream_dir):
    from click.testing import CliRunner

    from ashstream.cli import main

    path = str(stream_dir / "report.yaml")
    validated = CliRunner().invoke(main, ["validate", path], catch_exceptions=False)
    inspected = CliRunner().invoke(main, ["inspect", path], catch_exceptions=False)
    assert validated.exit_code == inspected.exit_code == 0, validated.output
    for shown in (validated.stderr, " ".join(inspected.stdout.split())):
        assert "price_q = quantile(price, q=[0.1, 0.5, 0.95], method=exact) per region" in shown
        assert "p95_sketch = quantile(price, q=0.95, method=sketch, relative_error=0.01)" in shown
        assert "top_qty = top(qty, n=3) per region; mode_day = mode(day) per block" in shown
        assert "median_by_day: price by day (median, method=exact per auto)" in shown
