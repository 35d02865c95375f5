"""Hostile and mistaken report definitions fail fast, as a ReportError (exit code 2) with
a short message, never as an internal error: alias bombs, deep nesting, keys given twice,
huge numbers, huge files, and whatever a fuzzer makes of a report's keys."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ashstream.errors import ReportError
from ashstream.report import (
    CHART_AGGS,
    FUNCTIONS,
    MAX_CHUNK_SIZE,
    MAX_REPORT_BYTES,
    PARAM_TYPES,
    Report,
    load_report,
    report_from_mapping,
)
from tests.conftest import assert_one_line

BASE = "name: x\nsource: {duckdb: {query: 'SELECT 1 AS a'}}\n"


def bomb() -> str:
    """A flow list of ten anchored lists, each of nine aliases to the one before: nine
    'x' at the bottom, 9**10 (3.5 billion) of them when expanded."""
    levels = ["&a0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "[" + ", ".join(levels) + "]"


def load_error(directory: Path, text: str) -> str:
    """The message of the ReportError that loading ``text`` as a report raises."""
    path = directory / "report.yaml"
    path.write_text(text)
    with pytest.raises(ReportError) as caught:
        load_report(path)
    return str(caught.value)


BOMBS = [
    pytest.param(f"pipeline: {{chunk_size: {bomb()}}}\n", "pipeline.chunk_size", id="chunk_size"),
    pytest.param(
        f"pipeline: {{memory_limit: {bomb()}}}\n", "pipeline.memory_limit", id="memory_limit"
    ),
    pytest.param(
        f"params: {{n: {{type: int, default: {bomb()}}}}}\n", "params.n.default", id="default"
    ),
    pytest.param(f"output: {{detail: {bomb()}}}\n", "output.detail", id="detail"),
]


@pytest.mark.parametrize(("text", "key"), BOMBS)
def test_an_alias_bomb_fails_fast_with_a_short_message(tmp_path, text, key):
    started = time.perf_counter()
    message = load_error(tmp_path, BASE + text)
    elapsed = time.perf_counter() - started
    assert elapsed < 2, f"{elapsed:.2f} s"
    assert f"report.yaml: {key}: " in message and ", got [['x', 'x', 'x', 'x', ...], " in message
    assert len(message) < 500, message


@pytest.mark.process
def test_an_alias_bomb_under_a_memory_limit_exits_2_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BASE + BOMBS[0].values[0])

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))  # the repr took 2.2 GB

    result = subprocess.run(
        [sys.executable, "-m", "ashstream", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
    )
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, "Error: ", "bomb.yaml: pipeline.chunk_size: expected")
    assert "Internal error" not in result.stderr


def test_80k_fields_validate_in_under_2_s():
    names = [f"f{i}" for i in range(80_000)]
    data = {
        "name": "wide",
        "source": {"duckdb": {"query": "SELECT 1"}},
        "fields": names,
        "groups": [{"name": f"g{i}", "field": name} for i, name in enumerate(names[:100])],
        "variables": [
            {"name": f"v{i}", "function": "sum", "field": name, "reset": f"g{i % 100}"}
            for i, name in enumerate(names[::10])
        ],
    }
    started = time.perf_counter()
    report = report_from_mapping(data)
    elapsed = time.perf_counter() - started
    assert len(report.fields) == 80_000 and len(report.variables) == 8000
    assert elapsed < 2, f"{elapsed:.2f} s"

    data["fields"] = [*names, "f0"]
    started = time.perf_counter()
    with pytest.raises(
        ReportError, match=r"fields\[80000\]\.name: 'f0' is used twice \(first by fields\[0\]\)"
    ):
        report_from_mapping(data)
    assert time.perf_counter() - started < 2

    data["fields"] = names[1:]
    with pytest.raises(ReportError) as caught:
        report_from_mapping(data)
    message = str(caught.value)  # the fields are listed, the first ten of them
    assert message.endswith("(fields: f1, f2, f3, f4, f5, f6, f7, f8, f9, f10 and 79,989 more)")


def test_brackets_100000_deep_are_a_report_error(tmp_path):
    started = time.perf_counter()
    message = load_error(tmp_path, "[" * 100_000)
    assert time.perf_counter() - started < 2
    assert "nested deeper than 64 levels (line 1)" in message


@pytest.mark.parametrize(
    ("text", "part"),
    [
        pytest.param(BASE + "title: " + "[" * 65 + "]" * 65 + "\n", "deeper than 64", id="flow"),
        pytest.param(
            BASE + "title:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 70)),
            "nested deeper than 64 levels",
            id="block",
        ),
        pytest.param(
            BASE + "params:\n  a: {type: int, default: &deep " + "[" * 40 + "]" * 40 + "}\n"
            "  b: {type: int, default: " + "[" * 30 + "*deep" + "]" * 30 + "}\n",
            "params.b.default" + "[0]" * 30 + ": nested deeper than 64 levels through the "
            "alias *deep (line 5)",
            id="through-an-alias",
        ),
        pytest.param(
            BASE + "title: &self [*self]\n",
            "title[0]: the alias *self is inside the value it names (line 3)",
            id="cycle",
        ),
    ],
)
def test_nesting_past_64_levels_is_a_report_error(tmp_path, text, part):
    assert part in load_error(tmp_path, text)


def test_64_levels_pass_the_reading(tmp_path):
    text = BASE + "title: " + "[" * 63 + "]" * 63 + "\n"  # with the top mapping: 64
    assert "title: expected a non-empty string, got a list" in load_error(tmp_path, text)


def test_a_key_given_twice_is_a_report_error(tmp_path):
    text = "name: x\nsource:\n  where: a > 1\n  duckdb:\n    query: 'SELECT 1 AS a'\n\n  where: a > 2\n"
    message = load_error(tmp_path, text)
    assert (
        message
        == f"{tmp_path / 'report.yaml'}: source: the key 'where' is given twice (lines 3 and 7)"
    )
    message = load_error(tmp_path, "name: x\nsource: {duckdb: {query: a, 'query': b}}\n")
    assert message.endswith("source.duckdb: the key 'query' is given twice (lines 2 and 2)")
    message = load_error(tmp_path, BASE + "fields: [{name: a}, {name: b, column: a, name: c}]\n")
    assert message.endswith("fields[1]: the key 'name' is given twice (lines 3 and 3)")


def test_merge_keys_work_as_in_safe_load(tmp_path):
    text = (
        "name: m\nsource: {duckdb: {query: 'SELECT 1 AS a'}}\nfields:\n"
        "  - &a {name: a, column: a}\n"
        "  - &b {<<: *a, name: b}\n"  # overrides a merged key: not a key given twice
        "  - {<<: [*b, *a], name: c}\n"
    )
    path = tmp_path / "report.yaml"
    path.write_text(text)
    assert [(f.name, f.column) for f in load_report(path).fields] == [
        ("a", "a"),
        ("b", "a"),
        ("c", "a"),
    ]
    assert yaml.safe_load(text)["fields"][2] == {"name": "c", "column": "a"}


@pytest.mark.parametrize(
    ("text", "part"),
    [
        (
            "pipeline: {chunk_size: 1000000000000000000000000000000}",
            "chunk_size: expected a whole number from 1 to 10,000,000, got 1000000000000000000000000000000",
        ),
        ("pipeline: {chunk_size: 0x" + "f" * 100_000 + "}", "got <an integer of 400,000 bits>"),
        (
            "pipeline: {workers: 1000000}",
            "workers: expected auto or a whole number from 1 to 1,024",
        ),
        (
            "pipeline: {memory_limit: 99999999999999999999 TB}",
            "memory_limit: a size must be at most 4 EiB",
        ),
        (
            "pipeline: {memory_limit: '" + "9" * 400 + " B'}",
            "memory_limit: a size must be at most 4 EiB",
        ),
        (
            "pipeline: {source_memory: 9223372036854775808}",
            "source_memory: a size must be at most 4 EiB",
        ),
        (
            "pipeline: {memory_limit: '1" + " " * 100_000 + "x'}",
            "memory_limit: expected a size such as",
        ),
        (
            "output: {pdf_max_rows: 10000000000}",
            "pdf_max_rows: expected a whole number from 0 to 1,000,000,000",
        ),
        (
            "charts: [{name: c, x: a, y: a, points: 10000000}]",
            "points: expected a whole number from 3 to 1,000,000",
        ),
    ],
    ids=[
        "chunk_size",
        "hex-chunk_size",
        "workers",
        "memory_limit",
        "inf-memory_limit",
        "source_memory",
        "spaces",
        "pdf_max_rows",
        "points",
    ],
)
def test_huge_numbers_are_a_report_error(tmp_path, text, part):
    started = time.perf_counter()
    message = load_error(tmp_path, BASE + text + "\n")
    assert time.perf_counter() - started < 2
    assert part in message and len(message) < 500, message


def test_the_largest_counts_pass(tmp_path):
    path = tmp_path / "report.yaml"
    path.write_text(BASE + f"pipeline: {{chunk_size: {MAX_CHUNK_SIZE}, workers: 1024}}\n")
    assert load_report(path).pipeline.chunk_size == MAX_CHUNK_SIZE


def test_a_file_past_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "report.yaml"
    path.write_text(BASE + "#" * MAX_REPORT_BYTES)
    with pytest.raises(ReportError) as caught:
        load_report(path)
    assert str(caught.value) == (
        f"{path}: the report is larger than 4 MiB, the most a report definition may be"
    )


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("title: !!timestamp soon", "not valid YAML: line 3: cannot read 'soon' as !!timestamp"),
        ("title: 2024-13-45", "cannot read '2024-13-45' as !!timestamp: month must be in 1..12"),
        ("title: !!int many", "cannot read 'many' as !!int"),
        ("title: !!bool maybe", "cannot read 'maybe' as !!bool"),
        ("title: !!float ''", "cannot read '' as !!float"),
        ("title: *nowhere", "found undefined alias 'nowhere'"),
        ("pipeline: {timezone: America}", "unknown time zone 'America'"),
        ("source: {parquet: " + "a" * 300 + ".parquet}", "no such Parquet file: "),
        ("output: {template: " + "t/" * 3000 + "}", "no such template file: "),
        ('source: {parquet: "~x\\0y"}', "source.parquet: a path cannot hold a NUL character"),
        ("params:\n  ? " + "p" * 10_000 + "-\n  : {type: int}", "params.ppp"),
    ],
    ids=[
        "timestamp",
        "date",
        "int",
        "bool",
        "float",
        "undefined-alias",
        "time-zone-folder",
        "long-file-name",
        "long-path",
        "nul",
        "long-key",
    ],
)
def test_odd_values_are_a_report_error(tmp_path, text, part):
    head = "name: x\n" if text.startswith("source") else BASE
    message = load_error(tmp_path, head + text + "\n")
    assert part in message and len(message) < 1000, message


# ---- fuzzing: any document built around a report's keys

# Hypothesis draws the ends of a list most: valid values go there, odd ones inside.
FIELD = st.sampled_from(["a", "", "b", "a b", "c"])
WORDS = st.sampled_from(
    ["x", "auto", "day", "report", "UTC", "512MiB", "0 B", "SELECT 1 AS a", "data.parquet"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 3, 10**30, 2**62 + 1, 2**1000]),
    st.floats(),
    st.text(max_size=8),
    WORDS,
    st.dates(),
    st.datetimes(),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5) | WORDS, inner, max_size=3)
    ),
    max_leaves=8,
)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right shape, now and then anything: a report has some forty
    keys, and a mistake in any one stops the checks of those after it."""
    # Not one_of(valid, ..., JUNK): Hypothesis draws the end branches far more often.
    return st.integers(0, 15).flatmap(lambda i: JUNK if i == 7 else valid)


def spec(always: dict | None = None, /, **optional: st.SearchStrategy) -> st.SearchStrategy:
    """A mapping of these keys, each of the wrong shape now and then, and those not in
    ``always`` sometimes missing."""
    return maybe(
        st.fixed_dictionaries(
            {k: maybe(v) for k, v in (always or {}).items()},
            optional={k: maybe(v) for k, v in optional.items()},
        )
    )


SOURCE_KEYS = {
    "where": st.sampled_from(["a > 1", "", "a < 2"]),
    "order_by": st.lists(FIELD, max_size=2) | FIELD,
    "count_rows": st.booleans(),
    "sorted": st.booleans(),
}
PARQUET = st.sampled_from(["data.parquet", "none.parquet", "x" * 300, ".", "*.parquet"]) | st.lists(
    st.sampled_from(["data.parquet", "none-*.parquet"]), max_size=2
)
DUCKDB = spec(
    {"query": st.sampled_from(["SELECT 1 AS a", "", "SELECT $n AS a"])},
    database=st.sampled_from(["db.duckdb", "none.duckdb"]),
)
SOURCE = spec({"parquet": PARQUET}, **SOURCE_KEYS) | spec({"duckdb": DUCKDB}, **SOURCE_KEYS)
REPORTS = spec(
    {"name": st.sampled_from(["r", "report-1", "bad name", "r_2", "x"]), "source": SOURCE},
    title=st.text(min_size=1, max_size=10),
    params=st.dictionaries(
        st.sampled_from(["n", "d", "bad-name"]),
        spec(
            type=st.sampled_from(["int", "integer", *PARAM_TYPES[1:]]),
            default=SCALARS,
            required=st.booleans(),
        ),
        max_size=2,
    ),
    fields=st.lists(FIELD | spec(name=FIELD, column=FIELD, expr=st.just("a + 1")), max_size=4),
    groups=st.lists(
        spec(
            name=st.sampled_from(["g", "report", "h"]),
            field=FIELD,
            expr=st.just("a % 2"),
            order=st.sampled_from(["asc", "up", "desc"]),
        ),
        max_size=2,
    ),
    variables=st.lists(
        spec(
            name=st.sampled_from(["v", "a", "w"]),
            function=st.sampled_from(FUNCTIONS),
            field=FIELD,
            reset=st.sampled_from(["report", "g", "h"]),
            running=st.booleans(),
        ),
        max_size=3,
    ),
    charts=st.lists(
        spec(
            name=st.sampled_from(["c", "d"]),
            x=FIELD,
            y=FIELD,
            agg=st.sampled_from(CHART_AGGS),
            bucket=st.sampled_from(["auto", 0, float("inf"), float("nan"), "day", 2.5]),
            points=st.integers(0, 2 * 10**6),
            series=FIELD,
        ),
        max_size=2,
    ),
    output=spec(
        typst=st.just("out.typ"),
        pdf=st.just("out.pdf"),
        template=st.sampled_from(["template.typ", "none.typ"]),
        pdf_max_rows=st.integers(-1, 2 * 10**9),
        detail=st.booleans(),
        template_rows=st.sampled_from(["preview", "most", "all"]),
    ),
    pipeline=spec(
        chunk_size=st.integers(-1, 2 * MAX_CHUNK_SIZE),
        workers=st.integers(-1, 2000) | st.sampled_from(["auto", "all", "auto"]),
        memory_limit=st.sampled_from(["512MiB", "0.5 B", "lots", "99999 TB", "2 GB"]),
        timezone=st.sampled_from(["UTC", "America", "Mars/Base", "../x", "Europe/Paris"]),
        source_memory=st.integers(-1, 2**63),
    ),
)
# What a hand or a bad merge does to YAML text: brackets, anchors, tags, a line twice.
PIECES = st.sampled_from(
    [
        *"[]{},'\"#|%\\\t\n\x00\ufeff\ud800",
        *(": ", "- ", "  ", "? ", "&a ", "*a", "<<: *a\n", "---\n"),
        *("!!int ", "!!timestamp ", "!!binary ", "!!set "),
    ]
)
EDITS = st.lists(
    st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "repeat line"]), PIECES),
    max_size=3,
)


def edit(text: str, edits: list[tuple[int, str, str]]) -> str:
    """``text`` with each piece inserted or deleted at a position, or a line repeated."""
    for at, how, piece in edits:
        i = at % (len(text) + 1)
        if how == "insert":
            text = text[:i] + piece + text[i:]
        elif how == "delete":
            text = text[:i] + text[i + len(piece) :]
        else:
            start, end = text.rfind("\n", 0, i) + 1, text.find("\n", i) + 1 or len(text)
            text = text[:end] + text[start:end] + text[end:]
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Files the generated reports may name."""
    folder = tmp_path_factory.mktemp("fuzz")
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), folder / "data.parquet")
    (folder / "template.typ").write_text("#let x = 1\n")
    (folder / "db.duckdb").write_bytes(b"")
    return folder


def assert_report_or_error(load: Callable[[], Report]) -> None:
    """``load`` returns a Report or raises a ReportError with a bounded message; any other
    exception is a bug, and goes on up for Hypothesis to shrink."""
    try:
        assert isinstance(load(), Report)
    except ReportError as exc:
        assert len(str(exc)) < 2000, exc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=REPORTS, flow=st.booleans(), edits=EDITS)
def test_any_definition_is_a_report_or_a_report_error(folder, data, flow, edits):
    assert_report_or_error(lambda: report_from_mapping(data, "<fuzz>", folder))
    path = folder / "fuzz.yaml"
    text = edit(yaml.safe_dump(data, default_flow_style=flow), edits)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a lone surrogate: bad UTF-8
    assert_report_or_error(lambda: load_report(path))
