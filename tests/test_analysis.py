"""Groups, variables and charts against an oracle: DuckDB's GROUP BY and window functions
over the same data. The engine's answer must also be identical for every chunk size and
worker count, with batches as small as one row, so that groups continue across batch
boundaries in every possible way.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typst
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ashstream import EncodeError, InlineStream, SourceError, StreamPool, load_report
from ashstream.analysis.charts import lttb
from ashstream.sources import source_sql
from tests.conftest import write_report
from tests.typst_roundtrip import evaluate_module

pytestmark = [pytest.mark.process, pytest.mark.timeout(600)]

CHUNK_SIZES = (1, 3, 1000)
WORKERS = (1, 2, 3)
ORDER = "g1 ASC, g2 DESC, id"  # what the report's groups and order_by ask for

SPEC = {
    "name": "analysed",
    "groups": [
        {"name": "g1", "field": "g1"},
        {"name": "g2", "field": "g2", "order": "desc"},
    ],
    "variables": [
        {"name": "amount_sum", "function": "sum", "field": "amount", "reset": "g1"},
        {"name": "days", "function": "count_distinct", "field": "day", "reset": "g1"},
        {"name": "first_price", "function": "first", "field": "price", "reset": "g1"},
        {"name": "price_avg", "function": "avg", "field": "price", "reset": "g2"},
        {"name": "qty_min", "function": "min", "field": "qty", "reset": "g2"},
        {"name": "day_max", "function": "max", "field": "day", "reset": "g2"},
        {"name": "price_sd", "function": "stddev", "field": "price", "reset": "g2"},
        {"name": "qty_count", "function": "count", "field": "qty", "reset": "g2"},
        {"name": "last_amount", "function": "last", "field": "amount", "reset": "g2"},
        {"name": "big_sum", "function": "sum", "field": "big", "reset": "g2"},
        {"name": "price_sum", "function": "sum", "field": "price", "reset": "g2"},
        {"name": "amount_var", "function": "variance", "field": "amount", "reset": "g2"},
        {"name": "rows", "function": "count", "reset": "report"},
        {"name": "total_price", "function": "sum", "field": "price", "reset": "report"},
        {"name": "total_amount", "function": "sum", "field": "amount", "reset": "report"},
        {"name": "qty_avg", "function": "avg", "field": "qty", "reset": "report"},
        {"name": "g1_values", "function": "count_distinct", "field": "g1", "reset": "report"},
        {"name": "min_price", "function": "min", "field": "price", "reset": "report"},
        {"name": "max_amount", "function": "max", "field": "amount", "reset": "report"},
        # running values, one per row
        {
            "name": "run_amount",
            "function": "sum",
            "field": "amount",
            "reset": "g1",
            "running": True,
        },
        {"name": "run_rows", "function": "count", "reset": "report", "running": True},
        {
            "name": "run_price_max",
            "function": "max",
            "field": "price",
            "reset": "g2",
            "running": True,
        },
        {
            "name": "run_price_sum",
            "function": "sum",
            "field": "price",
            "reset": "g2",
            "running": True,
        },
        {
            "name": "run_qty_avg",
            "function": "avg",
            "field": "qty",
            "reset": "report",
            "running": True,
        },
        {
            "name": "run_last_day",
            "function": "last",
            "field": "day",
            "reset": "g1",
            "running": True,
        },
        {
            "name": "run_first_amount",
            "function": "first",
            "field": "amount",
            "reset": "g2",
            "running": True,
        },
    ],
    "charts": [
        {"name": "monthly", "x": "day", "y": "amount", "agg": "sum", "bucket": "month"},
        {"name": "auto_count", "x": "day", "agg": "count", "points": 6},
        {
            "name": "yearly",
            "x": "day",
            "y": "price",
            "agg": "avg",
            "bucket": "year",
            "series": "g1",
        },
        {"name": "qty_bins", "x": "qty", "y": "price", "agg": "max", "bucket": 10},
        {"name": "trace", "x": "id", "y": "price", "agg": "none", "points": 5},
    ],
}

# (DuckDB expression, the ashstream variable) per level; window forms for running values.
LEVEL_1 = {
    "amount_sum": "sum(amount)",
    "days": "count(DISTINCT day)",
    "first_price": "arg_min(price, pos) FILTER (WHERE price IS NOT NULL)",
    # a running variable is also the group's variable: its value at the group's end
    "run_amount": "sum(amount)",
    "run_last_day": "arg_max(day, pos) FILTER (WHERE day IS NOT NULL)",
}
LEVEL_2 = {
    "price_avg": "avg(price)",
    "qty_min": "min(qty)",
    "day_max": "max(day)",
    "price_sd": "stddev_samp(price)",
    "qty_count": "count(qty)",
    "last_amount": "arg_max(amount, pos) FILTER (WHERE amount IS NOT NULL)",
    "big_sum": "sum(big::HUGEINT)",
    "price_sum": "sum(price)",
    "amount_var": "var_samp(amount)",
    "run_price_max": "max(price)",
    "run_price_sum": "sum(price)",
    "run_first_amount": "arg_min(amount, pos) FILTER (WHERE amount IS NOT NULL)",
}
REPORT = {
    "rows": "count(*)",
    "total_price": "sum(price)",
    "total_amount": "sum(amount)",
    "qty_avg": "avg(qty)",
    "g1_values": "count(DISTINCT g1)",
    "min_price": "min(price)",
    "max_amount": "max(amount)",
    "run_rows": "count(*)",
    "run_qty_avg": "avg(qty)",
}
RUNNING = {
    "run_amount": "sum(amount) OVER (PARTITION BY g1 {w})",
    "run_rows": "count(*) OVER ({w})",
    "run_price_max": "max(price) OVER (PARTITION BY g1, g2 {w})",
    "run_price_sum": "sum(price) OVER (PARTITION BY g1, g2 {w})",
    "run_qty_avg": "avg(qty) OVER ({w})",
    "run_last_day": "last_value(day IGNORE NULLS) OVER (PARTITION BY g1 {w})",
    "run_first_amount": "first_value(amount IGNORE NULLS) OVER (PARTITION BY g1, g2 {w})",
}
WINDOW = "ORDER BY pos ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("g1", pa.string()),
        ("g2", pa.int64()),
        ("amount", pa.decimal128(12, 2)),
        ("price", pa.float64()),
        ("qty", pa.int64()),
        ("big", pa.int64()),
        ("day", pa.date32()),
    ]
)


@pytest.fixture(scope="module")
def small_batch_pools():
    """Pools whose batches are as small as the chunks, so that chunk size moves every
    batch boundary (the default reads at least 16384 rows per batch)."""
    pools = {w: StreamPool(w, min_batch_rows=1) for w in WORKERS}
    for pool in pools.values():
        pool.open()
    yield pools
    for pool in pools.values():
        pool.close()


def rows_strategy():
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    row = st.fixed_dictionaries(
        {
            "g1": st.sampled_from(["a", "b", "c", None]),
            "g2": st.sampled_from([0, 1, 2, None]),
            "amount": maybe(
                st.integers(-(10**10), 10**10).map(lambda c: decimal.Decimal(c).scaleb(-2))
            ),
            "price": maybe(
                st.one_of(
                    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                    st.sampled_from([0.1, 0.2, 0.3, -0.0, 1e-300, 2.5]),
                )
            ),
            "qty": maybe(st.integers(-1000, 1000)),
            "big": maybe(st.integers(-(2**63), 2**63 - 1)),
            "day": maybe(st.dates(dt.date(2019, 1, 1), dt.date(2022, 12, 31))),
        }
    )
    return st.lists(row, max_size=40)


def table_of(rows: list[dict]) -> pa.Table:
    ids = np.random.default_rng(len(rows)).permutation(len(rows)).tolist()
    columns = {name: [r[name] for r in rows] for name in SCHEMA.names if name != "id"}
    return pa.table({"id": ids, **columns}, schema=SCHEMA)


def report_for(directory: Path, table: pa.Table, **extra):
    pq.write_table(table, directory / "data.parquet")
    spec = {**SPEC, "source": {"parquet": "data.parquet", "order_by": "id"}, **extra}
    return load_report(write_report(directory, spec))


def run(pool: StreamPool | None, report, chunk_size: int) -> dict:
    """What a stream gives: on the pool, or (None) in this process with InlineStream."""
    if pool is None:
        handle = InlineStream(report, chunk_size, min_batch_rows=1)
    else:
        handle = pool.start(report, chunk_size)
    text, groups = b"", []
    for chunk in handle:
        text += chunk.text
        groups += chunk.groups
    summary = handle.summary
    groups += summary.groups
    return {
        "text": text,
        "groups": [(g.level, g.keys, g.first_row, g.last_row, g.variables) for g in groups],
        "totals": summary.totals,
        "charts": summary.charts,
    }


# ------------------------------------------------------------------------- oracle


def oracle(table: pa.Table) -> dict:
    con = duckdb.connect()
    con.register("t", table)
    con.execute(
        f"CREATE TABLE o AS SELECT *, row_number() OVER (ORDER BY {ORDER}) - 1 AS pos FROM t"
    )

    def grouped(keys: str, level: int, exprs: dict) -> list:
        select = ", ".join(f"{e} AS {n}" for n, e in exprs.items())
        sql = (
            f"SELECT {keys}, min(pos), max(pos), {select} FROM o GROUP BY {keys} ORDER BY min(pos)"
        )
        out = []
        for row in con.sql(sql).fetchall():
            key_path, rest = row[:level], row[level:]
            out.append(
                (level, tuple(key_path), rest[0], rest[1], dict(zip(exprs, rest[2:], strict=True)))
            )
        return out

    groups = grouped("g1", 1, LEVEL_1) + grouped("g1, g2", 2, LEVEL_2)
    # closing order: by last row, inner level first
    groups.sort(key=lambda g: (g[3], -g[0]))
    values = con.sql(f"SELECT {', '.join(REPORT.values())} FROM o").fetchall()[0]
    totals = dict(zip(REPORT, values, strict=True))
    running_sql = ", ".join(f"{e.format(w=WINDOW)} AS {n}" for n, e in RUNNING.items())
    running = con.sql(f"SELECT {running_sql} FROM o ORDER BY pos").fetchall()
    charts = {
        "monthly": con.sql(
            "SELECT date_trunc('month', day)::DATE, sum(amount) FROM o WHERE day IS NOT NULL "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall(),
        "yearly": con.sql(
            "SELECT g1, date_trunc('year', day)::DATE, avg(price) FROM o WHERE day IS NOT NULL "
            "GROUP BY ALL ORDER BY g1 NULLS LAST, 2"
        ).fetchall(),
        "qty_bins": con.sql(
            "SELECT (floor(qty / 10) * 10)::BIGINT, max(price) FROM o WHERE qty IS NOT NULL "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall(),
    }
    auto = None
    for unit in ("day", "week", "month", "quarter", "year"):
        buckets = con.sql(
            f"SELECT date_trunc('{unit}', day)::DATE, count(*) FROM o WHERE day IS NOT NULL "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
        if len(buckets) <= 6 or unit == "year":
            auto = (unit, buckets)
            break
    charts["auto_count"] = auto
    trace = con.sql(
        "SELECT id, price FROM o WHERE price IS NOT NULL AND isfinite(price) ORDER BY id"
    ).fetchall()
    charts["trace"] = trace
    return {"groups": groups, "totals": totals, "running": running, "charts": charts}


EPS = sys.float_info.epsilon
ULPS = 4  # roundings after the sums: ours once, DuckDB's division, sqrt and conversions


def error_bounds(table: pa.Table) -> dict[str, float]:
    """How far DuckDB's float64 answer may be from ours, per variable, from its inputs.

    Ours are exact (sums of Fractions, rounded once). DuckDB adds floats in some order,
    each addition off by at most eps/2 of the partial sum, so a sum of n terms is off by
    at most (n - 1) * eps/2 * sum|x| (Higham's bound, for any order), and an average by
    that over its count, no more. Its variance (Welford's updates) is off by about
    n * eps * sum(x**2) at most. The table's n and sums bound those of any group or
    running prefix.
    """

    def column(name: str) -> np.ndarray:
        return np.array([float(v) for v in table.column(name).to_pylist() if v is not None])

    price, qty, amount = column("price"), column("qty"), column("amount")
    sums = {
        "price": ULPS * EPS * len(price) * np.abs(price).sum(),
        "qty": ULPS * EPS * len(qty) * np.abs(qty).sum(),
    }
    return {
        **dict.fromkeys(
            ("price_avg", "price_sum", "run_price_sum", "total_price", "yearly"), sums["price"]
        ),
        **dict.fromkeys(("qty_avg", "run_qty_avg"), sums["qty"]),
        "price_sd": ULPS * EPS * len(price) * (price**2).sum(),  # of its square, the variance
        "amount_var": ULPS * EPS * len(amount) * (amount**2).sum(),
    }


STDDEVS = {"price_sd"}  # compared as their squares: |a - b| = |a² - b²| / (a + b)


def assert_close(ours, theirs, what: str, bound: float | None = None, squared: bool = False):
    """Equal, or for a float result within ``bound`` (from :func:`error_bounds`) or a few
    ulps of it; ``squared`` compares a standard deviation through its variance."""
    if bound is None or ours is None or theirs is None:
        assert ours == theirs, f"{what}: {ours!r} != {theirs!r}"
        return
    a, b = (float(ours) ** 2, float(theirs) ** 2) if squared else (float(ours), float(theirs))
    assert math.isclose(a, b, rel_tol=ULPS * EPS, abs_tol=bound), (
        f"{what}: {ours!r} != {theirs!r} (bound {bound:.3g}{' on squares' if squared else ''})"
    )


def from_norm(value):
    """A value read back through Typst (see tests/typst_roundtrip.py) as Python."""
    tag = value[0]
    if tag == "none":
        return None
    if tag == "int":
        return int(value[1])
    if tag == "str":
        return value[1]
    if tag == "float":
        return float(value[1])
    if tag == "decimal":
        return decimal.Decimal(value[1][len('decimal("') : -2])
    if tag == "datetime":
        return dt.date(*value[1:4])
    raise AssertionError(f"unexpected {value!r}")


def check_against_oracle(result: dict, table: pa.Table) -> None:
    expected = oracle(table)
    bounds = error_bounds(table)
    assert len(result["groups"]) == len(expected["groups"])
    for ours, theirs in zip(result["groups"], expected["groups"], strict=True):
        assert ours[:4] == theirs[:4]
        assert ours[4].keys() == theirs[4].keys()
        for name, value in theirs[4].items():
            assert_close(
                ours[4][name], value, f"group {theirs[1]} {name}", bounds.get(name), name in STDDEVS
            )
    for name, value in expected["totals"].items():
        assert_close(result["totals"][name], value, f"total {name}", bounds.get(name))

    names = list(RUNNING)
    module = "#let rows = (\n" + result["text"].decode() + ")\n"
    got = evaluate_module(module, f"rows.map(r => ({', '.join(f'r.{n}' for n in names)},))")
    assert len(got[1]) == len(expected["running"])
    for i, (ours, theirs) in enumerate(zip(got[1], expected["running"], strict=True)):
        for name, value, want in zip(names, ours[1], theirs, strict=True):
            assert_close(from_norm(value), want, f"row {i} {name}", bounds.get(name))

    charts = result["charts"]
    assert charts["monthly"]["unit"] == "month"
    assert [(p["x"], p["y"]) for p in charts["monthly"]["points"]] == expected["charts"]["monthly"]
    unit, buckets = expected["charts"]["auto_count"]
    assert charts["auto_count"]["unit"] == unit
    assert [(p["x"], p["y"]) for p in charts["auto_count"]["points"]] == buckets
    yearly = [(s["key"], p["x"], p["y"]) for s in charts["yearly"]["series"] for p in s["points"]]
    assert len(yearly) == len(expected["charts"]["yearly"])
    for ours, theirs in zip(yearly, expected["charts"]["yearly"], strict=True):
        assert ours[:2] == theirs[:2]
        assert_close(ours[2], theirs[2], "yearly avg", bounds["yearly"])
    assert [(p["x"], p["y"]) for p in charts["qty_bins"]["points"]] == expected["charts"][
        "qty_bins"
    ]
    trace = [(p["x"], p["y"]) for p in charts["trace"]["points"]]
    series = expected["charts"]["trace"]
    assert len(trace) == min(5, len(series))
    assert set(trace) <= set(series)  # a subset of the input, in x order
    assert trace == sorted(trace)
    if series:
        assert trace[0] == series[0] and trace[-1] == series[-1]


# -------------------------------------------------------------------------- tests


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy())
def test_same_result_for_every_chunk_size_and_worker_count(small_batch_pools, rows):
    table = table_of(rows)
    directory = Path(tempfile.mkdtemp(prefix="ashstream-analysis-"))
    try:
        report = report_for(directory, table)
        first = run(small_batch_pools[1], report, 1000)
        check_against_oracle(first, table)
        for workers in WORKERS:
            for chunk_size in CHUNK_SIZES:
                result = run(small_batch_pools[workers], report, chunk_size)
                assert result == first, f"{workers} workers, chunk size {chunk_size} differ"
        for chunk_size in CHUNK_SIZES:  # the same batch job, in this process
            assert run(None, report, chunk_size) == first, f"inline, chunk size {chunk_size}"
    finally:
        shutil.rmtree(directory)


def test_groups_across_many_batches_match_the_oracle(small_batch_pools, tmp_path):
    """Long groups cut by many batch boundaries, one-row groups, and nulls as keys."""
    rng = np.random.default_rng(7)
    n = 3000
    g1 = rng.choice(["north", "south", None], n, p=[0.6, 0.399, 0.001]).tolist()
    table = pa.table(
        {
            "id": rng.permutation(n),
            "g1": g1,
            "g2": rng.choice([0, 1, 2, 3, 4, 5, 6, 7], n).tolist(),
            "amount": [
                decimal.Decimal(int(c)).scaleb(-2) for c in rng.integers(-(10**6), 10**6, n)
            ],
            "price": rng.normal(100, 1e4, n),
            "qty": rng.integers(-1000, 1000, n),
            "big": rng.integers(2**61, 2**62, n),
            "day": pa.array(rng.integers(17000, 19000, n).astype("int32")).cast(pa.date32()),
        },
        schema=SCHEMA,
    )
    report = report_for(tmp_path, table)
    first = run(small_batch_pools[2], report, 7)
    check_against_oracle(first, table)
    assert run(small_batch_pools[3], report, 256) == first
    assert run(None, report, 7) == first


def test_an_empty_source_has_totals_and_no_groups(small_batch_pools, tmp_path):
    table = SCHEMA.empty_table()
    result = run(small_batch_pools[2], report_for(tmp_path, table), 10)
    assert result["groups"] == []
    assert result["totals"]["rows"] == 0
    assert result["totals"]["total_amount"] is None
    assert result["totals"]["g1_values"] == 0
    assert all(chart["points"] == [] for chart in result["charts"].values())
    check_against_oracle(result, table)


# ----------------------------------------------------------------------- LTTB


def reference_lttb(x: list[float], y: list[float], n_out: int) -> list[int]:
    """Steinarsson's algorithm written plainly, one point at a time."""
    n = len(x)
    if n_out >= n:
        return list(range(n))
    every = (n - 2) / (n_out - 2)
    out, a = [0], 0
    for i in range(n_out - 2):
        lo, hi = math.floor(i * every) + 1, math.floor((i + 1) * every) + 1
        nxt = min(math.floor((i + 2) * every) + 1, n)
        ax = sum(x[hi:nxt]) / (nxt - hi)
        ay = sum(y[hi:nxt]) / (nxt - hi)
        best, best_area = lo, -1.0
        for j in range(lo, hi):
            area = abs((x[a] - ax) * (y[j] - y[a]) - (x[a] - x[j]) * (ay - y[a]))
            if area > best_area:
                best, best_area = j, area
        out.append(best)
        a = best
    return [*out, n - 1]


@settings(max_examples=200, deadline=None)
@given(
    ys=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=300),
    n_out=st.integers(3, 50),
)
def test_lttb_known_properties(ys, n_out):
    x = np.arange(len(ys), dtype=np.float64)
    y = np.array(ys, dtype=np.float64)
    chosen = lttb(x, y, n_out).tolist()
    assert len(chosen) == min(n_out, len(ys))
    assert chosen == sorted(set(chosen))  # distinct points, in x order
    if ys:
        assert chosen[0] == 0 and chosen[-1] == len(ys) - 1
    assert chosen == reference_lttb(x.tolist(), ys, n_out)


def test_lttb_keeps_a_spike():
    y = np.zeros(10_000)
    y[6543] = 1000.0
    chosen = lttb(np.arange(10_000, dtype=np.float64), y, 100)
    assert 6543 in chosen.tolist()


def test_a_million_points_become_a_few_hundred(tmp_path):
    spec = {
        "name": "trace",
        "source": {
            "duckdb": {
                "query": "SELECT i AS t, sin(i / 5000.0) * 100 + CASE WHEN i = 777777 "
                "THEN 5000 ELSE 0 END AS v FROM range(1000000) r(i)"
            }
        },
        "charts": [{"name": "trace", "x": "t", "y": "v", "agg": "none", "points": 300}],
    }
    report = load_report(write_report(tmp_path, spec))
    with StreamPool(2) as pool:
        handle = pool.start(report, 50_000)
        for _ in handle:
            pass
        points = handle.summary.charts["trace"]["points"]
    assert len(points) == 300
    assert points[0]["x"] == 0 and points[-1]["x"] == 999_999
    assert {"x": 777777, "y": pytest.approx(5000 + math.sin(777777 / 5000) * 100)} in points


# ------------------------------------------------------- the module and the template

BANDED = {
    "name": "banded",
    "title": "Sales by region",
    "source": {
        "duckdb": {
            "query": "SELECT i AS id, ['north', 'south', 'east'][1 + (i % 3)::INT] AS region, "
            "DATE '2024-01-01' + (i % 100)::INT AS day, (i % 997 / 4)::DECIMAL(10, 2) AS amount "
            "FROM range(2000) t(i)"
        },
        "order_by": "id",
    },
    "groups": [
        {"name": "region", "field": "region"},
        {"name": "month", "expr": "date_trunc('month', day)", "order": "desc"},
    ],
    "variables": [
        {"name": "region_total", "function": "sum", "field": "amount", "reset": "region"},
        {"name": "orders", "function": "count", "reset": "report"},
        {"name": "total", "function": "sum", "field": "amount"},
        {"name": "avg_amount", "function": "avg", "field": "amount", "reset": "month"},
        {
            "name": "running",
            "function": "sum",
            "field": "amount",
            "reset": "region",
            "running": True,
        },
    ],
    "charts": [
        {"name": "daily", "x": "day", "y": "amount", "agg": "sum", "points": 500},
        {"name": "trace", "x": "id", "y": "amount", "agg": "none", "points": 50},
        # bars (few buckets), and one line per series with a legend
        {"name": "months", "x": "day", "agg": "count", "bucket": "month"},
        {"name": "by_region", "x": "day", "y": "amount", "bucket": "week", "series": "region"},
    ],
    "output": {"typst": "out/banded.typ", "pdf": "out/banded.pdf", "pdf_max_rows": 100},
}


def banded_oracle() -> dict:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE o AS {BANDED['source']['duckdb']['query']}")
    regions = con.sql(
        "SELECT region, count(*), sum(amount), count(DISTINCT date_trunc('month', day)) "
        "FROM o GROUP BY region ORDER BY region"
    ).fetchall()
    totals = con.sql("SELECT count(*), sum(amount) FROM o").fetchall()[0]
    return {"regions": regions, "orders": totals[0], "total": totals[1]}


def test_the_module_holds_groups_totals_and_charts_and_the_banded_template_shows_them(tmp_path):
    from click.testing import CliRunner

    from ashstream.cli import main
    from ashstream.templates import default_template

    report = write_report(tmp_path, BANDED)
    spills = set(Path(tempfile.gettempdir()).glob("ashstream-duckdb-*"))
    result = CliRunner().invoke(
        main, ["run", str(report), "--chunk-size", "64", "--workers", "2", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "banded.pdf").read_bytes().startswith(b"%PDF")
    # DuckDB's spill folder for the sort is gone with the stream
    assert set(Path(tempfile.gettempdir()).glob("ashstream-duckdb-*")) <= spills
    module = (tmp_path / "out" / "banded.typ").read_text()
    want = banded_oracle()

    regions = evaluate_module(
        module, "groups.map(g => (g.key, g.rows, g.variables.region_total, g.groups.len()))"
    )
    assert [tuple(from_norm(v) for v in r[1]) for r in regions[1]] == [
        (region, rows, total, months) for region, rows, total, months in want["regions"]
    ]
    totals = dict((k, from_norm(v)) for k, v in evaluate_module(module, "totals")[1])
    assert totals == {"orders": want["orders"], "total": want["total"]}
    daily = evaluate_module(module, "(charts.daily.unit, charts.daily.points.len())")
    assert daily == ["array", [["str", "day"], ["int", "100"]]]
    trace = evaluate_module(module, "charts.trace.points.len()")
    assert trace == ["int", "50"]
    months = evaluate_module(module, "charts.months.points.map(p => p.y)")
    assert [from_norm(v) for v in months[1]] == [620, 580, 620, 180]  # Jan..Apr 2024
    series = evaluate_module(module, "charts.by_region.series.map(s => s.key)")
    assert [from_norm(v) for v in series[1]] == ["east", "north", "south"]

    # The template's summary exposes the totals it shows through a label.
    for detail in ("true", "false"):
        (tmp_path / "out" / "data.typ").write_text(
            module.replace('"detail": true', f'"detail": {detail}')
        )
        shown = typst.query(
            default_template(),
            "<ashstream-totals>",
            field="value",
            one=True,
            root=str(tmp_path / "out"),
            sys_inputs={"data": "/data.typ"},
        )
        assert json.loads(shown) == {"orders": 2000, "total": f'decimal("{want["total"]}")'}


def test_calendar_buckets_of_zoned_timestamps_follow_the_display_zone_and_nested_values_count(
    small_batch_pools, tmp_path
):
    """Berlin's day of the switch to summer time has 23 hours; DuckDB, set to the same
    zone, agrees on every bucket. Lists and structs count as distinct by value."""
    query = (
        "SELECT i AS id, TIMESTAMPTZ '2024-03-30 20:00:00+00' + to_minutes(i * 30) AS at, "
        "{'a': i % 2} AS s, [i % 3] AS l, i * 1.5 AS v FROM range(200) t(i)"
    )
    spec = {
        "name": "zoned",
        "source": {"duckdb": {"query": query}, "order_by": "id"},
        "variables": [
            {"name": "kinds", "function": "count_distinct", "field": "s"},
            {"name": "lists", "function": "count_distinct", "field": "l"},
        ],
        "charts": [
            {"name": "hourly", "x": "at", "y": "v", "agg": "sum", "bucket": "hour"},
            {"name": "daily", "x": "at", "agg": "count", "bucket": "day"},
        ],
        "pipeline": {"timezone": "Europe/Berlin"},
    }
    result = run(small_batch_pools[2], load_report(write_report(tmp_path, spec)), 7)
    assert result["totals"] == {"kinds": 2, "lists": 3}
    con = duckdb.connect()
    con.execute("SET TimeZone = 'Europe/Berlin'")
    for name, unit in (("hourly", "hour"), ("daily", "day")):
        y = "sum(v)" if unit == "hour" else "count(*)"
        want = con.sql(
            f"SELECT date_trunc('{unit}', \"at\")::TIMESTAMP, {y} FROM ({query}) GROUP BY 1 ORDER BY 1"
        ).fetchall()
        got = [(p["x"], p["y"]) for p in result["charts"][name]["points"]]
        if unit == "day":
            want = [(x.date(), y) for x, y in want]
        assert got == want
    assert len(result["charts"]["daily"]["points"]) == 6


def test_nan_and_null_keys_are_one_group_each_across_batches():
    """As in GROUP BY: NaN equals NaN and null equals null, also across a batch boundary."""
    from ashstream.analysis.aggregate import Analysis, Collector, analyse_batch
    from ashstream.report import Group, Report, Source, Variable

    report = Report(
        path="<test>",
        name="nan",
        source=Source(query="SELECT 1"),
        groups=(Group("k", field="k"),),
        variables=(Variable("n", "count", None, "k"),),
    )
    analysis = Analysis.of(report)
    collector = Collector(analysis)
    nan = float("nan")
    closed = collector.add(analyse_batch(pa.record_batch({"k": [1.0, nan, nan]}), analysis, 0), 0)
    closed += collector.add(
        analyse_batch(pa.record_batch({"k": [nan, None, None, 2.0]}), analysis, 3), 3
    )
    closed += collector.finish()
    assert [(g.first_row, g.last_row, g.variables["n"]) for g in closed] == [
        (0, 0, 1),
        (1, 3, 3),
        (4, 5, 2),
        (6, 6, 1),
    ]
    assert math.isnan(closed[1].key) and closed[2].key is None


def test_wide_decimals_sum_exactly_in_groups_and_running(small_batch_pools, tmp_path):
    """DECIMAL(30, 4) values near 10**22 (beyond int64 once unscaled): sums and
    running sums stay exact."""
    query = (
        "SELECT i AS id, i % 3 AS g, (1234567890123456789012.3456 * (i - 20))::DECIMAL(30, 4) "
        "AS big FROM range(50) t(i)"
    )
    spec = {
        "name": "wide",
        "source": {"duckdb": {"query": query}, "order_by": "id"},
        "groups": [{"name": "g", "field": "g"}],
        "variables": [
            {"name": "total", "function": "sum", "field": "big", "reset": "g"},
            {"name": "run", "function": "sum", "field": "big", "reset": "g", "running": True},
        ],
    }
    result = run(small_batch_pools[3], load_report(write_report(tmp_path, spec)), 4)
    con = duckdb.connect()
    want = con.sql(f"SELECT g, sum(big) FROM ({query}) GROUP BY g ORDER BY g").fetchall()
    assert [(g[1][0], g[4]["total"]) for g in result["groups"]] == want
    running = con.sql(
        f"SELECT sum(big) OVER (PARTITION BY g ORDER BY id) FROM ({query}) ORDER BY g, id"
    ).fetchall()
    got = evaluate_module(
        "#let rows = (\n" + result["text"].decode() + ")\n", "rows.map(r => r.run)"
    )
    assert [from_norm(v) for v in got[1]] == [r[0] for r in running]


@pytest.mark.parametrize("chunk_size", [1, 1000])
def test_running_integer_sums_near_and_beyond_64_bits(small_batch_pools, tmp_path, chunk_size):
    """Sums that pass 2**62 but stay 64-bit are exact and the same for every batching;
    one that leaves 64 bits fails clearly (a Typst int has 64), whatever the batching."""
    values = "[4611686018427387904, 2305843009213693952, -4611686018427387904, 7]"
    query = f"SELECT i AS id, {values}[i + 1] AS v FROM range(4) t(i)"
    spec = {
        "name": "near",
        "source": {"duckdb": {"query": query}, "order_by": "id"},
        "variables": [{"name": "run", "function": "sum", "field": "v", "running": True}],
    }
    result = run(small_batch_pools[2], load_report(write_report(tmp_path, spec)), chunk_size)
    got = evaluate_module(
        "#let rows = (\n" + result["text"].decode() + ")\n", "rows.map(r => r.run)"
    )
    assert [from_norm(v) for v in got[1]] == [2**62, 2**62 + 2**61, 2**61, 2**61 + 7]
    spec["source"]["duckdb"]["query"] = query.replace("-4611686018427387904", "4611686018427387904")
    with pytest.raises(EncodeError, match=r"the running sum 'run' reaches .* DECIMAL"):
        run(small_batch_pools[2], load_report(write_report(tmp_path, spec)), chunk_size)


def test_three_levels_nest_in_the_module(tmp_path):
    from click.testing import CliRunner

    from ashstream.cli import main

    query = "SELECT i AS id, i % 2 AS a, i % 3 AS b, i % 5 AS c FROM range(90) t(i)"
    spec = {
        "name": "three",
        "source": {"duckdb": {"query": query}, "order_by": "id"},
        "groups": [{"name": n, "field": n} for n in ("a", "b", "c")],
        "variables": [{"name": "n", "function": "count", "reset": "c"}],
        "output": {"typst": "three.typ"},
    }
    report = write_report(tmp_path, spec)
    result = CliRunner().invoke(main, ["run", str(report), "--chunk-size", "7", "-q"])
    assert result.exit_code == 0, result.stderr
    shape = evaluate_module(
        (tmp_path / "three.typ").read_text(),
        "groups.map(a => (a.key, a.rows, a.groups.map(b => (b.key, b.groups.map(c => "
        "(c.key, c.first_row, c.last_row, c.variables.n))))))",
    )

    def plain(value):
        return [plain(v) for v in value[1]] if value[0] == "array" else from_norm(value)

    want = [
        [a, 45, [[b, [[c, None, None, 3] for c in range(5)]] for b in range(3)]] for a in range(2)
    ]
    got = plain(shape)
    first = 0
    for a in got:
        for b in a[2]:
            for c in b[1]:
                assert c[1] == first and c[2] == first + 2  # 3 rows each, in order
                first += 3
                c[1] = c[2] = None
    assert got == want


def test_a_source_already_sorted_is_not_sorted_again_and_its_order_is_checked(
    small_batch_pools, tmp_path
):
    rng = np.random.default_rng(11)
    n = 2000
    table = pa.table(
        {
            "id": rng.permutation(n),
            "g1": rng.choice(["a", "b", "c", None], n).tolist(),
            "g2": rng.choice([0, 1, 2, 3], n).tolist(),
            "amount": [
                decimal.Decimal(int(c)).scaleb(-2) for c in rng.integers(-(10**6), 10**6, n)
            ],
            "price": rng.normal(0, 100, n),
            "qty": rng.integers(-1000, 1000, n),
            "big": rng.integers(0, 2**40, n),
            "day": pa.array(rng.integers(17000, 19000, n).astype("int32")).cast(pa.date32()),
        },
        schema=SCHEMA,
    )
    unsorted_dir, sorted_dir = tmp_path / "unsorted", tmp_path / "sorted"
    unsorted_dir.mkdir()
    sorted_dir.mkdir()
    expected = run(small_batch_pools[2], report_for(unsorted_dir, table), 100)
    con = duckdb.connect()
    con.register("t", table)
    ordered = con.sql(f"SELECT * FROM t ORDER BY {ORDER}").to_arrow_table()
    report = report_for(sorted_dir, ordered, source={"parquet": "data.parquet", "sorted": True})
    assert "ORDER BY" not in source_sql(report)
    assert run(small_batch_pools[3], report, 100) == expected

    report = report_for(sorted_dir, table, source={"parquet": "data.parquet", "sorted": True})
    with pytest.raises(SourceError, match=r"source\.sorted is set, but the rows are not in"):
        run(small_batch_pools[2], report, 100)


def test_sorted_keys_compare_as_order_by_does():
    from ashstream.analysis.aggregate import _sorts_after

    nan = float("nan")
    ascending = [1.0, 2.0, nan, None]  # DuckDB: NaN above every number, nulls last
    descending = [nan, 2.0, 1.0, None]
    for order, desc in ((ascending, False), (descending, True)):
        for i, before in enumerate(order):
            for j, after in enumerate(order):
                if i != j:
                    assert _sorts_after(after, before, desc) == (j > i), (before, after, desc)
