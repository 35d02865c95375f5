"""The ``ashstream`` command, in a real subprocess and through click's runner."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
from click.testing import CliRunner

import ashstream
from ashstream import encode
from ashstream.cli import main
from tests.conftest import assert_one_line, mixed_sql, mixed_table, write_report
from tests.reference import assert_same, to_model
from tests.typst_roundtrip import evaluate_module


def command(*args: str) -> list[str]:
    """The command line of ``ashstream ARGS`` in this Python, for a subprocess."""
    return [sys.executable, "-m", "ashstream", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=60)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == (
        f"ashstream, version {ashstream.__version__} (encoder: {encode.encoder_name()})"
    )
    chosen = subprocess.run(
        command("--version"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ASHSTREAM_ENCODER": "reference"},
    )
    assert chosen.stdout.strip().endswith("(encoder: reference)")


def test_a_bad_encoder_setting_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "ASHSTREAM_ENCODER": "turbo"}
    for args in (["--version"], ["validate", str(tmp_path / "missing.yaml")]):
        result = subprocess.run(command(*args), capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2, result
        assert_one_line(result.stderr, "ASHSTREAM_ENCODER must be 'native', 'reference' or unset")


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Typst values" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "No such command 'frobnicate'" in result.stderr


# ------------------------------------------------------------------------ ashstream run


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--json"], ["--help"]], ids=["run --json", "--help"])
def test_output_to_a_full_disk_is_one_line_and_exit_1(tmp_path, args):
    report = write_report(tmp_path, {"name": "f", "source": {"duckdb": {"query": mixed_sql(5)}}})
    command_line = ["run", str(report), "-q", "-o", str(tmp_path / "f.typ"), *args]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            command(*command_line), stdout=full, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert result.returncode == 1
    assert_one_line(result.stderr, "cannot write the output: No space left on device")


RUN_THEN_CHECK_PANDAS = """
import sys
from ashstream.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "pandas" not in sys.modules, "the run imported pandas"
import pyarrow as pa
assert pa.table({"a": [7]}).to_pandas()["a"][0] == 7  # pyarrow still converts when asked
"""


def test_a_run_never_imports_pandas_yet_pyarrow_still_converts(tmp_path):
    """pyarrow would import pandas (~0.2 s, half a small report's run) to ask whether an
    input is a pandas object; the command tells it not to (ashstream.startup)."""
    pytest.importorskip("pandas")  # the test extras install it, with Ray
    import pyarrow.parquet as pq

    pq.write_table(mixed_table(50), tmp_path / "mixed.parquet")
    report = write_report(tmp_path, {"name": "p", "source": {"parquet": "mixed.parquet"}})
    args = ["run", str(report), "-q", "-o", str(tmp_path / "p.typ")]  # in this process
    result = subprocess.run(
        [sys.executable, "-c", RUN_THEN_CHECK_PANDAS, *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.typ").exists()


@pytest.mark.process
@pytest.mark.timeout(180)
def test_run_writes_a_module_typst_imports_with_the_same_values_and_a_pdf(tmp_path):
    from ashstream import EncodeOptions

    report = write_report(
        tmp_path,
        {
            "name": "mixed",
            "title": "Mixed values",
            "source": {"duckdb": {"query": mixed_sql(700)}},
            "params": {"limit": {"type": "int", "default": 3}},
            "output": {"typst": "out/mixed.typ", "pdf": "out/mixed.pdf", "pdf_max_rows": 50},
        },
    )
    result = invoke("run", str(report), "--chunk-size", "64", "--workers", "2", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "700 rows in" in result.stderr
    module = (tmp_path / "out" / "mixed.typ").read_text()
    table = mixed_table(700)
    got = evaluate_module(module, "rows")
    options = EncodeOptions()
    columns = {name: to_model(table[name].combine_chunks(), options) for name in table.column_names}
    want = [{name: columns[name][i] for name in table.column_names} for i in range(700)]
    assert_same(got, want, options)
    meta = evaluate_module(module, "meta")
    assert dict((k, v) for k, v in meta[1])["row_count"] == ["int", "700"]
    assert dict((k, v) for k, v in meta[1])["params"] == ["dict", [["limit", ["int", "3"]]]]
    pdf = (tmp_path / "out" / "mixed.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mixed.pdf", "mixed.typ"]


def write_template_report(tmp_path, template_source: str, query: str, **output: str):
    """A report writing t.typ through a user template with ``template_source``."""
    (tmp_path / "template.typ").write_text(template_source)
    return write_report(
        tmp_path,
        {
            "name": "t",
            "source": {"duckdb": {"query": query}},
            "output": {"typst": "t.typ", "template": "template.typ", **output},
        },
    )


@pytest.mark.process
def test_run_with_a_user_template(tmp_path):
    report = write_template_report(
        tmp_path,
        "#import sys.inputs.data: rows, meta\n= #meta.name: #rows.len() rows\n",
        "SELECT * FROM range(10) t(i)",
    )
    result = invoke("run", str(report), "--pdf", str(tmp_path / "t.pdf"), "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.process
def test_run_refuses_an_unwritable_output_and_writes_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    report = write_report(tmp_path, {"name": "w", "source": {"duckdb": {"query": "SELECT 1 AS a"}}})
    result = invoke("run", str(report), "-o", str(blocker / "out.typ"), "--no-progress")
    assert result.exit_code == 1
    assert "Error: cannot create the folder for" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "report.yaml"]


@pytest.mark.process
def test_a_failing_run_leaves_no_partial_module(tmp_path):
    query = "SELECT CASE WHEN i < 3000 THEN i::VARCHAR ELSE 'x' END::INT AS v FROM range(6000) t(i)"
    report = write_report(tmp_path, {"name": "f", "source": {"duckdb": {"query": query}}})
    result = invoke("run", str(report), "-o", str(tmp_path / "f.typ"), "--chunk-size", "100")
    assert result.exit_code == 1
    assert "Conversion Error" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.yaml"]


# A source with a text, a number and a date column, for the groups/variables/charts checks.
SMALL = (
    "name: x\nsource: {duckdb: {query: "
    "\"SELECT 'a' AS region, 1 AS amount, DATE '2020-01-01' AS day\"}}\n"
)
BAD_REPORTS = [
    pytest.param(
        "title: x\nsource: {duckdb: {query: 'SELECT 1'}}\n", "name: missing", id="missing-name"
    ),
    pytest.param(
        "name: 'a b'\nsource: {duckdb: {query: 'SELECT 1'}}\n",
        "name: 'a b' is not an identifier",
        id="bad-name",
    ),
    pytest.param("name: x\n", "source: missing", id="missing-source"),
    pytest.param(
        "name: x\nsource: {parquet: a.parquet, duckdb: {query: 'SELECT 1'}}\n",
        "give exactly one of source.parquet and source.duckdb",
        id="both-sources",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\ntitel: y\n",
        "titel: unknown key",
        id="unknown-top-key",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}, wher: a}\n",
        "source.wher: unknown key",
        id="unknown-source-key",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\ngroups: []\n",
        "groups: expected a non-empty list, got an empty list",
        id="empty-groups",
    ),
    pytest.param(
        SMALL + "groups: [{name: r, field: regio}]\n",
        "groups[0].field: the source has no column 'regio' (it has: region, amount, day)",
        id="unknown-group-field",
    ),
    pytest.param(
        SMALL + "fields: [region, amount]\ngroups: [{name: r, field: day}]\n",
        "groups[0].field: 'day' is not a field of the report (fields: region, amount)",
        id="group-field-not-a-field",
    ),
    pytest.param(
        SMALL + "groups: [{name: r, field: region}]\n"
        "variables: [{name: t, function: sum, field: amount, reset: month}]\n",
        "variables[0].reset: unknown group 'month'; expected report or one of the groups' names (r)",
        id="reset-on-unknown-group",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: p99, field: amount}]\n",
        "variables[0].function: unknown function 'p99'; expected one of count, count_distinct",
        id="unknown-function",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: sum, field: region}]\n",
        "variables[0].field: sum needs a number, and 'region' is string",
        id="sum-of-text",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: stddev, field: amount, running: true}]\n",
        "variables[0].running: a running stddev is not supported",
        id="running-stddev",
    ),
    pytest.param(
        SMALL
        + "variables: [{name: t, function: count}, {name: t, function: sum, field: amount}]\n",
        "variables[1].name: 't' is used twice",
        id="duplicate-variable",
    ),
    pytest.param(
        SMALL + "fields: [region, amount]\n"
        "variables: [{name: amount, function: sum, field: amount, running: true}]\n",
        "variables[0].name: a running variable adds a column to every row, and 'amount' is already",
        id="running-name-clash",
    ),
    pytest.param(
        SMALL + "variables: [{name: day, function: count, running: true}]\n",
        "variables[0].name: a running variable adds a column to every row, and the source "
        "already has a column 'day'",
        id="running-name-clash-with-source",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: region}]\n",
        "charts[0].y: a chart's y must be a number, and 'region' is string",
        id="chart-text-y",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: amount, y: amount, bucket: month}]\n",
        "charts[0].bucket: month buckets need a date or timestamp x",
        id="calendar-bucket-numeric-x",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: amount, bucket: fortnight}]\n",
        "charts[0].bucket: expected auto, one of hour, day, week, month, quarter, year",
        id="unknown-bucket",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: amount}, {name: c, x: day, agg: count}]\n",
        "charts[1].name: 'c' is used twice",
        id="duplicate-chart",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}, sorted: maybe}\n",
        "source.sorted: expected true or false, got 'maybe'",
        id="bad-sorted",
    ),
    pytest.param(
        SMALL + "pipeline: {source_memory: lots}\n",
        "pipeline.source_memory: expected a size such as 512MiB or 2GB, got 'lots'",
        id="bad-source-memory",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: amount, points: 2}]\n",
        "charts[0].points: expected a whole number >= 3, got 2",
        id="too-few-points",
    ),
    pytest.param(
        "name: x\nsource: {parquet: missing.parquet}\n",
        "source.parquet: no such Parquet file",
        id="missing-parquet",
    ),
    pytest.param(
        "name: x\nsource: {parquet: 'nothing-*.parquet'}\n",
        "source.parquet: no file matches",
        id="empty-glob",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {database: nope.duckdb, query: 'SELECT 1'}}\n",
        "source.duckdb.database: no such database file",
        id="missing-database",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {}}\n", "source.duckdb.query: missing", id="missing-query"
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\nparams: {n: {type: integer}}\n",
        "params.n.type: expected one of int, float",
        id="bad-param-type",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\nparams: {n: {type: int, default: abc}}\n",
        "parameter 'n' expects a int, got 'abc'",
        id="bad-param-default",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT $n'}}\nparams: {n: {type: int, required: true}}\n",
        "params.n: required and not given",
        id="missing-required-param",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\nfields: [{name: a, column: b, expr: c}]\n",
        "fields[0]: give either column or expr, not both",
        id="field-column-and-expr",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\nfields: [a, a]\n",
        "fields[1].name: 'a' is used twice",
        id="duplicate-field",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\npipeline: {chunk_size: 0}\n",
        "pipeline.chunk_size: expected a whole number >= 1, got 0",
        id="bad-chunk-size",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\npipeline: {memory_limit: lots}\n",
        "pipeline.memory_limit: expected a size such as 512MiB",
        id="bad-memory-limit",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\npipeline: {timezone: Mars/Base}\n",
        "pipeline.timezone: unknown time zone 'Mars/Base'",
        id="bad-timezone",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\noutput: {template: none.typ}\n",
        "output.template: no such template file",
        id="missing-template",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1'}}\noutput: {template_rows: most}\n",
        "output.template_rows: expected one of preview, all, got 'most'",
        id="bad-template-rows",
    ),
    pytest.param("name: x\nsource: [1, 2\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("", "the file is empty", id="empty-file"),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELEC 1'}}\n",
        "source.duckdb.query: DuckDB cannot parse the query: Parser Error: syntax error",
        id="sql-syntax-error",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1 AS a'}}\nfields: [a, b]\n",
        "fields[1]: the source has no column 'b' (it has: a)",
        id="unknown-field-column",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1 AS a'}}\nfields: [{name: b, expr: 'nope + 1'}]\n",
        'Referenced column "nope" not found',
        id="bad-field-expr",
    ),
    pytest.param(
        "name: x\nsource: {duckdb: {query: 'SELECT 1 AS a'}, where: 'a >'}\n",
        "source.where: expected one SQL expression, got 'a >' (DuckDB: syntax error at or near",
        id="bad-where",
    ),
    # ---- median, quantile, top, mode
    pytest.param(
        SMALL + "variables: [{name: t, function: quantile, field: amount}]\n",
        "variables[0].q: missing; give the quantile (0 to 1), or a list of them",
        id="quantile-without-q",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: quantile, q: [0.5, 1.5], field: amount}]\n",
        "variables[0].q[1]: expected a number from 0 to 1, got 1.5",
        id="q-out-of-range",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, q: 0.4, field: amount}]\n",
        "variables[0].q: function median takes no q; q is for quantile",
        id="median-with-q",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: sum, method: sketch, field: amount}]\n",
        "variables[0].method: function sum takes no method; method is for median and quantile",
        id="method-on-sum",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, method: fast, field: amount}]\n",
        "variables[0].method: expected one of exact, sketch, got 'fast'",
        id="unknown-method",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, relative_error: 0.1, field: amount}]\n",
        "variables[0].relative_error: is for method: sketch",
        id="relative-error-on-exact",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, method: sketch, relative_error: 0.9, "
        "field: amount}]\n",
        "variables[0].relative_error: expected a number from 0.001 to 0.5, got 0.9",
        id="relative-error-out-of-range",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, method: sketch, interpolate: true, "
        "field: amount}]\n",
        "variables[0].interpolate: is for method: exact (a sketch never does)",
        id="interpolate-on-sketch",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, running: true, field: amount}]\n",
        "variables[0].running: a running median is not supported",
        id="running-median",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: top, n: 0, field: region}]\n",
        "variables[0].n: expected a whole number >= 1, got 0",
        id="top-n-zero",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, field: region}]\n",
        "variables[0].field: median needs a number, date or timestamp, and this is string",
        id="median-of-strings",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, method: sketch, field: day}]\n",
        "variables[0].field: median method: sketch needs numbers, and this is date32[day]; "
        "use method: exact",
        id="sketch-of-dates",
    ),
    pytest.param(
        'name: x\nsource: {duckdb: {query: "SELECT 1.5::DECIMAL(4, 1) AS d"}}\n'
        "variables: [{name: t, function: median, interpolate: true, field: d}]\n",
        "variables[0].field: median interpolate: true needs integers or floats",
        id="interpolated-decimal",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: median, field: amount, options: {a: 1}}]\n",
        "variables[0].options: median is built in and takes no options mapping",
        id="options-on-built-in",
    ),
    pytest.param(
        SMALL + "variables: [{name: t, function: 'tests.example_aggregates:WeightedMean', "
        "field: amount}]\n",
        "variables[0].function: unknown function 'tests.example_aggregates:WeightedMean'",
        id="yaml-cannot-name-code",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: amount, agg: quantile, q: [0.5, 0.9]}]\n",
        "charts[0].q: a chart's point is one value: give one q",
        id="chart-with-several-q",
    ),
    pytest.param(
        SMALL + "charts: [{name: c, x: day, y: amount, agg: sum, q: 0.5}]\n",
        "charts[0].q: agg sum takes no q; q is for quantile",
        id="q-on-a-sum-chart",
    ),
]


@pytest.mark.process
@pytest.mark.parametrize(("text", "message"), BAD_REPORTS)
def test_bad_report_definitions(tmp_path, text, message):
    report = tmp_path / "bad.yaml"
    report.write_text(text)
    result = invoke("run", str(report), "-o", str(tmp_path / "out.typ"), "--no-progress")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.typ").exists()


def test_bad_command_line_values():
    result = invoke("run", "x.yaml", "--param", "novalue")
    assert result.exit_code == 2
    assert "expected NAME=VALUE" in result.stderr
    result = invoke("run", "does-not-exist.yaml")
    assert result.exit_code == 2
    assert "does-not-exist.yaml: no such report file" in result.stderr
    result = invoke("run", "x.yaml", "--chunk-size", "0")
    assert result.exit_code == 2


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_exits_cleanly_and_writes_nothing(tmp_path, signum, code):
    """The signal comes once the first batch is done (the pool's own telemetry, read from
    the debug log): every process is up and the stream runs."""
    import psutil

    from tests.watch import segments_of_this_run

    query = "SELECT i, repeat('x', 200) AS s FROM range(100000000) t(i)"
    report = write_report(tmp_path, {"name": "long", "source": {"duckdb": {"query": query}}})
    process = subprocess.Popen(
        command(
            *("run", str(report), "-o", str(tmp_path / "o.typ"), "--no-progress"),
            *("--workers", "2", "--log-level", "debug", "--log-format", "json"),
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    before = []
    for line in process.stderr:
        before.append(line)
        if '"event": "batch.done"' in line:
            break
    assert before and '"event": "batch.done"' in before[-1], "".join(before)
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signum)
    # 100M rows take minutes: exiting within the timeout, with the signal's code and no
    # summary, is the signal's doing, not the run's end (a wall-clock bound would flake).
    after = process.communicate(timeout=30)[1]
    # What the command itself printed: every line but the JSON log's.
    said = "".join(line for line in before + after.splitlines(True) if not line.startswith("{"))
    assert process.returncode == code, said
    assert "rows in" not in said
    assert "nothing was written" in said
    assert "Traceback" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.yaml"]
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert segments_of_this_run() == []


@pytest.mark.process
def test_run_json_prints_one_summary_and_nothing_else(tmp_path):
    import json

    report = write_report(
        tmp_path,
        {"name": "j", "source": {"duckdb": {"query": "SELECT * FROM range(12345) t(i)"}}},
    )
    out = tmp_path / "j.typ"
    result = invoke("run", str(report), "-o", str(out), "--json", "--chunk-size", "1000")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert summary["rows"] == 12345
    assert summary["chunks"] == 13
    assert summary["outputs"] == {"typst": str(out), "pdf": None}
    assert summary["restarts"] == 0 and summary["warnings"] == [] and summary["skipped_rows"] == []
    assert summary["rows_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["rows"] == out.read_text().count("),\n")  # matches what was written
    assert summary["groups"] == 0 and summary["totals"] == {}
    assert result.stderr == ""


@pytest.mark.process
def test_run_reports_groups_and_totals(tmp_path):
    import json

    spec = {
        "name": "t",
        "source": {
            "duckdb": {"query": "SELECT i, (i / 4)::DECIMAL(12, 2) AS d FROM range(12345) t(i)"}
        },
        "groups": [{"name": "thousand", "expr": "i // 1000"}],
        "variables": [
            {"name": "rows", "function": "count"},
            {"name": "total", "function": "sum", "field": "d"},
        ],
    }
    report = write_report(tmp_path, spec)
    out = str(tmp_path / "t.typ")
    result = invoke("run", str(report), "-o", out, "--json", "--chunk-size", "500")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["groups"] == 13
    assert summary["totals"] == {"rows": 12345, "total": "19048335.00"}  # exact, as text
    result = invoke("run", str(report), "-o", out, "--no-progress")
    assert "13 groups" in result.stderr and "Totals: rows 12345; total 19048335.00" in result.stderr


@pytest.mark.process
def test_run_json_reports_an_error_as_json_too(tmp_path):
    import json

    report = write_report(tmp_path, {"name": "e", "source": {"duckdb": {"query": "SELEC 1"}}})
    result = invoke("run", str(report), "-o", str(tmp_path / "e.typ"), "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "Parser Error" in error["error"]


@pytest.mark.process
def test_log_format_json_writes_one_object_per_line_with_telemetry_fields(tmp_path):
    import json

    report = write_report(
        tmp_path, {"name": "l", "source": {"duckdb": {"query": "SELECT * FROM range(100) t(i)"}}}
    )
    result = invoke(
        "run",
        str(report),
        "-o",
        str(tmp_path / "l.typ"),
        "--no-progress",
        "--quiet",
        "--log-level",
        "debug",
        "--log-format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    events = {line.get("event") for line in lines}
    assert {"pipeline.started", "batch.done", "pipeline.stopped"} <= events
    stopped = next(line for line in lines if line.get("event") == "pipeline.stopped")
    assert stopped["measurements"]["rows"] == 100 and stopped["level"] == "debug"


# ------------------------------------------------------------------ validate / inspect


@pytest.mark.process
def test_validate_accepts_a_good_report_without_running_it(tmp_path):
    report = write_report(
        tmp_path,
        {"name": "v", "source": {"duckdb": {"query": mixed_sql(500)}, "count_rows": True}},
    )
    result = invoke("validate", str(report))
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"OK: report 'v' ({report}): 10 fields, 500 rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.yaml"]


@pytest.mark.process
def test_validate_and_inspect_show_the_rows_as_groups_and_running_values_make_them(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "200")
    report = write_report(
        tmp_path,
        {
            "name": "g",
            "source": {"duckdb": {"query": mixed_sql(300)}, "order_by": "id"},
            "groups": [
                {"name": "letter", "field": "letter"},
                {"name": "month", "expr": "date_trunc('month', day)", "order": "desc"},
            ],
            "variables": [
                {"name": "run", "function": "sum", "field": "amount", "running": True},
                {"name": "kinds", "function": "count_distinct", "field": "name"},
            ],
            "charts": [{"name": "c", "x": "at", "y": "ratio", "agg": "none"}],
        },
    )
    result = invoke("validate", str(report))
    assert result.exit_code == 0, result.stderr
    assert "11 fields" in result.stderr  # 10 columns and the running value, no group key
    result = invoke("inspect", str(report))
    assert result.exit_code == 0, result.stderr
    assert 'ORDER BY "letter", "__group_month" DESC, id' in result.stdout
    table = result.stdout[result.stdout.index("┏") :]
    assert " run " in table and "__group_month" not in table
    assert "Groups: letter > month (desc)" in result.stdout
    assert "run = sum(amount) per report, running" in result.stdout
    assert "c: ratio by at downsampled, at most 500 points" in result.stdout


@pytest.mark.process
@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        (
            {"duckdb": {"query": "SELECT union_value(k := 1) AS choice"}},
            1,
            "column 'choice' of type sparse_union",
        ),
        ({"duckdb": {"query": "SELECT 1 AS a"}, "where": "b > 0"}, 2, 'column "b" not found'),
        ({"parquet": "nothing.parquet"}, 2, "source.parquet: no such Parquet file"),
    ],
    ids=["unsupported-type", "unknown-column-in-where", "missing-file"],
)
def test_validate_reports_what_a_run_would_fail_on(tmp_path, spec, code, message):
    report = write_report(tmp_path, {"name": "v", "source": spec})
    result = invoke("validate", str(report))
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr


@pytest.mark.process
def test_inspect_shows_schema_sql_typst_forms_and_an_honest_size_estimate(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    query = "SELECT i AS id, 'name ' || i AS name, DATE '2024-01-01' + (i % 9)::INT AS day FROM range(20000) t(i)"
    report = write_report(
        tmp_path,
        {
            "name": "i",
            "title": "Inspected",
            "source": {"duckdb": {"query": query}, "count_rows": True},
            "output": {"typst": "i.typ"},
        },
    )
    result = invoke("inspect", str(report))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Inspected" in out and "SQL: SELECT * FROM (SELECT i AS id" in out
    assert "date32[day]" in out and "datetime (date)" in out
    assert '"name 0"' in out and "Rows: 20,000" in out
    estimate_mib = float(out.split("will be about ")[1].split(" MiB")[0])
    assert invoke("run", str(report), "-q").exit_code == 0
    actual_mib = (tmp_path / "i.typ").stat().st_size / 2**20
    assert abs(estimate_mib - actual_mib) / actual_mib < 0.1


# ------------------------------------------------------------------------------ status


@pytest.mark.process
@pytest.mark.timeout(90)
def test_status_sees_a_running_job_from_another_process_and_not_a_finished_one(tmp_path):
    import json
    import os
    import stat
    import time

    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    query = "SELECT i, repeat('x', 100) AS s FROM range(100000000) t(i)"
    report = write_report(tmp_path, {"name": "long", "source": {"duckdb": {"query": query}}})
    job = subprocess.Popen(
        command("run", str(report), "-o", str(tmp_path / "o.typ"), "--no-progress"),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command("status", *args),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    try:
        deadline = time.monotonic() + 30
        streams = []
        while time.monotonic() < deadline:
            pools = json.loads(status("--json").stdout)
            streams = [s for p in pools for s in p["streams"] if s["rows"] > 0]
            if streams:
                break
            time.sleep(0.3)
        assert streams and streams[0]["report"] == "long"
        assert streams[0]["status"] == "running"
        assert pools[0]["pid"] == job.pid
        [file] = list((runtime / f"ashstream-{os.getuid()}").iterdir())
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700
        table = status()
        assert "long" in table.stdout and "running" in table.stdout
    finally:
        job.terminate()
        job.communicate(timeout=30)
    assert json.loads(status("--json").stdout) == []
    assert status().stdout.strip() == "No ashstream runs in progress."


@pytest.mark.process
def test_status_refuses_a_wrong_key_and_drops_stale_entries(tmp_path, monkeypatch):
    import json
    import multiprocessing

    from ashstream import StreamPool
    from ashstream.engines.local.registry import RegistryManager, running_pools
    from ashstream.status_files import runtime_dir_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    runtime = Path(runtime_dir_path())
    runtime.mkdir(mode=0o700)
    stale = runtime / f"{int(dead.stdout)}-0badcafe.json"
    stale.write_text(
        json.dumps(
            {"pid": int(dead.stdout), "address": "/nowhere", "authkey": "00", "started_at": 0}
        )
    )
    not_ours = runtime / "notes.json"  # not a status file's name: never read nor removed
    not_ours.write_text("{ not json")
    with StreamPool(1):
        pools = running_pools()
        assert [p["pid"] for p in pools] == [os.getpid()]
        assert not stale.exists()
        [file] = list(runtime.glob("[0-9]*.json"))
        address = json.loads(file.read_text())["address"]
        intruder = RegistryManager(address=address, authkey=b"not the key")
        with pytest.raises(multiprocessing.AuthenticationError):
            intruder.connect()
    assert list(runtime.glob("[0-9]*.json")) == []
    assert not_ours.read_text() == "{ not json"


# ----------------------------------------------------------------------------- memray


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_memray_session_records_every_process(tmp_path):
    import json

    import memray

    report = write_report(
        tmp_path, {"name": "m", "source": {"duckdb": {"query": mixed_sql(20000)}}}
    )
    profiles = tmp_path / "profiles"
    result = subprocess.run(
        command(
            "run",
            str(report),
            "-o",
            str(tmp_path / "m.typ"),
            "--workers",
            "2",
            "--memray",
            str(profiles),
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    roles = sorted(p["role"] for p in summary["profiles"])
    assert roles == ["parent", "producer0", "transformer0", "transformer1"]
    for entry in summary["profiles"]:
        reader = memray.FileReader(entry["file"])  # opens with memray's own reader
        try:
            assert reader.metadata.pid == entry["pid"]
            assert reader.metadata.peak_memory > 0
        finally:
            reader.close()
    graphs = [p["flamegraph"] for p in summary["profiles"] if "flamegraph" in p]
    assert len(graphs) == 2
    for graph in graphs:
        assert "<title>memray - flamegraph report</title>" in Path(graph).read_text()


@pytest.mark.process
def test_children_log_lines_reach_the_parents_log(tmp_path):
    import json

    report = write_report(
        tmp_path, {"name": "c", "source": {"duckdb": {"query": "SELECT * FROM range(40000) t(i)"}}}
    )
    result = subprocess.run(
        command(
            "run",
            str(report),
            "-o",
            str(tmp_path / "c.typ"),
            "--quiet",
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "--workers",
            "2",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    worker = [x for x in lines if x["logger"] == "ashstream.engines.local.transformer"]
    producer = [x for x in lines if x["logger"] == "ashstream.engines.local.producer"]
    assert worker and all("[transformer" in x["message"] for x in worker)
    assert any("rows encoded in" in x["message"] for x in worker)
    assert any(
        "40000 rows in" in x["message"] and "[producer0 pid" in x["message"] for x in producer
    )


@pytest.mark.process
@pytest.mark.parametrize(("text", "message"), BAD_REPORTS)
def test_validate_catches_every_bad_definition(tmp_path, text, message):
    report = tmp_path / "bad.yaml"
    report.write_text(text)
    result = invoke("validate", str(report))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr


@pytest.mark.process
def test_a_pdf_that_fails_to_compile_leaves_neither_pdf_nor_module(tmp_path):
    report = write_template_report(
        tmp_path,
        "#import sys.inputs.data: rows\n#rows.no-such-method()\n",
        "SELECT 1 AS a",
        pdf="t.pdf",
    )
    result = invoke("run", str(report), "--no-progress")
    assert result.exit_code == 1
    assert "Typst could not compile t.pdf" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.yaml", "template.typ"]


# ------------------------------------------------------------------ off the happy path

# `ashstream run` with a file-size limit (RLIMIT_FSIZE) of 64 KiB from the moment the
# stream starts: the shared-memory arena (a file in /dev/shm, also subject to the limit)
# is made by then, so the first file to meet the limit is the module. Python ignores
# SIGXFSZ, so the write fails with EFBIG, as a full disk fails with ENOSPC.
FILE_SIZE_LIMITED_RUN = """
import resource, sys
from ashstream import telemetry
from ashstream.cli import main

def limit(event, measurements, metadata):
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))

telemetry.attach("pipeline.started", limit)
main(sys.argv[1:], prog_name="ashstream")
"""


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_full_disk_is_one_line_exit_1_and_leaves_no_file(tmp_path):
    query = "SELECT i, repeat('x', 100) AS s FROM range(20000) t(i)"  # about 2.5 MB of text
    report = write_report(tmp_path, {"name": "big", "source": {"duckdb": {"query": query}}})
    out = tmp_path / "out" / "big.typ"
    args = ["run", str(report), "-o", str(out), "--no-progress", "--workers", "2"]
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED_RUN, *args],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line == f"Error: cannot write {out}: File too large"
    assert list(out.parent.iterdir()) == []


def finished_pid() -> int:
    """The pid of a process that has exited and been reaped: no process has it now."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.process
def test_a_run_removes_temporary_files_a_killed_run_left_and_no_others(tmp_path):
    dead, alive = finished_pid(), os.getppid()
    left = [
        f".out.typ.{dead}.tmp",  # a SIGKILLed run's module
        f".out.typ.{dead}.tmp.groups",
        f".out.pdf.{dead}.tmp",  # and its PDF
    ]
    kept = [
        f".out.typ.{alive}.tmp",  # a run still writing the same output
        f".out.typ.{alive}.tmp.groups",
        f".other.typ.{dead}.tmp",  # another output's
        f".out.typ.{dead}.tmp.bak",  # not a name ashstream writes
        f".out.typ.x{dead}.tmp",
    ]
    out = tmp_path / "out"
    out.mkdir()
    for name in left + kept:
        (out / name).write_text("stale")
    report = write_report(
        tmp_path, {"name": "s", "source": {"duckdb": {"query": "SELECT * FROM range(10) t(i)"}}}
    )
    result = invoke(
        "run", str(report), "-o", str(out / "out.typ"), "--pdf", str(out / "out.pdf"), "-q"
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "out.pdf", "out.typ"])


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_small_parquet_report_runs_in_this_process_and_writes_the_pools_bytes(tmp_path):
    """Groups, variables (a running one too), a chart, fields with an expression, where
    and a parameter: the module is the same byte for byte with and without a pool."""
    import json

    import duckdb

    duckdb.connect().execute(
        f"COPY ({mixed_sql(5000)}) TO '{tmp_path / 'mixed.parquet'}' (FORMAT parquet)"
    )
    report = write_report(
        tmp_path,
        {
            "name": "small",
            "source": {"parquet": "mixed.parquet", "where": "id >= $low", "order_by": "id"},
            "params": {"low": {"type": "int", "default": 0}},
            "fields": ["id", "letter", "amount", "day", {"name": "half", "expr": "ratio / 2"}],
            "groups": [{"name": "letter", "field": "letter"}],
            "variables": [
                {"name": "total", "function": "sum", "field": "amount", "reset": "letter"},
                {
                    "name": "upto",
                    "function": "sum",
                    "field": "amount",
                    "reset": "report",
                    "running": True,
                },
            ],
            "charts": [
                {"name": "per_day", "x": "day", "y": "amount", "agg": "sum", "bucket": "month"}
            ],
        },
    )
    runs = {}
    for engine, extra in (("inline", []), ("local", ["--inline-rows", "0"])):
        out = tmp_path / f"{engine}.typ"
        result = run_cli("run", str(report), "-o", str(out), "--json", "--param", "low=7", *extra)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["engine"] == engine
        runs[engine] = out.read_bytes().replace(out.name.encode(), b"")
    assert runs["inline"] == runs["local"]
    assert b"upto" in runs["inline"] and b"per_day" in runs["inline"]


@pytest.mark.process
@pytest.mark.parametrize(
    ("template_rows", "seen", "ok"),
    [(None, 50, True), ("all", 5000, True), (None, 5000, False)],
    ids=["preview by default", "every row when asked", "the check can fail"],
)
def test_a_user_template_reads_pdf_max_rows_unless_it_asks_for_every_row(
    tmp_path, template_rows, seen, ok
):
    template = (
        "#import sys.inputs.data: rows, groups, totals, charts, meta\n"
        f"#assert.eq(rows.len(), {seen})\n"
        f"#assert.eq(meta.rows_shown, {seen})\n"
        "#assert.eq(meta.row_count, 5000)\n"
        "= #meta.name\n"
    )
    output = {"pdf_max_rows": 50} | ({"template_rows": template_rows} if template_rows else {})
    report = write_template_report(tmp_path, template, "SELECT * FROM range(5000) t(i)", **output)
    result = invoke("run", str(report), "--pdf", str(tmp_path / "t.pdf"), "--json")
    if ok:
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")
        assert (tmp_path / "t.typ").read_bytes().count(b",\n") >= 5000  # the module is whole
        warnings = json.loads(result.stdout)["warnings"]
        cut = "the template read the first 50 of 5,000 rows (output.pdf_max_rows)"
        assert [w for w in warnings if w.startswith(cut)] == ([] if template_rows else [ANY])
    else:
        assert result.exit_code == 1
        assert "Typst could not compile t.pdf" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.yaml", "template.typ"]
