"""The report definition: YAML into frozen, validated dataclasses. Runs nothing.

Every error names the file, the key path (``source.parquet``, ``fields[2].expr``) and
what was expected. Unknown keys are errors, so a typo never passes silently. Paths are
relative to the YAML file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from ashstream.errors import ReportError

__all__ = [
    "BUCKET_UNITS",
    "Chart",
    "Field",
    "Group",
    "Output",
    "Param",
    "PipelineSettings",
    "Report",
    "Source",
    "Variable",
    "load_report",
    "parse_size",
]

PARAM_TYPES = ("int", "float", "str", "bool", "date", "datetime")
FUNCTIONS = (
    "count",
    "count_distinct",
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "stddev",
    "variance",
)
# A running value is a prefix aggregate per row; these have one that is cheap and exact.
RUNNING_FUNCTIONS = ("count", "sum", "avg", "min", "max", "first", "last")
CHART_AGGS = ("sum", "count", "avg", "min", "max", "none")
BUCKET_UNITS = ("hour", "day", "week", "month", "quarter", "year")
DEFAULT_CHART_POINTS = 500
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
DEFAULT_CHUNK_SIZE = 1000
# What DuckDB may hold for one stream's query (the sort that groups need, a join);
# beyond it DuckDB spills to a temporary folder instead of growing.
DEFAULT_SOURCE_MEMORY = 512 * 2**20
DEFAULT_PDF_MAX_ROWS = 2000


@dataclass(frozen=True)
class Source:
    """Exactly one of ``parquet`` (resolved files) or ``query`` (DuckDB SQL) is set."""

    parquet: tuple[str, ...] = ()
    database: str | None = None  # a DuckDB file opened read-only; None: in-memory
    query: str | None = None
    where: str | None = None
    order_by: tuple[str, ...] = ()
    count_rows: bool = False  # run COUNT(*) first so progress shows a total
    sorted: bool = False  # rows already come in group (and order_by) order: no ORDER BY
    # Set by an engine, never by YAML: read only rows [first, last) of the one file.
    row_range: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        return "parquet" if self.parquet else "duckdb"


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Field:
    """One output column: a source ``column`` renamed, or a SQL ``expr``."""

    name: str
    column: str | None = None
    expr: str | None = None


@dataclass(frozen=True)
class Group:
    """A level of grouping: consecutive rows with the same key. The source is ordered by
    the groups' keys, outermost first."""

    name: str
    field: str | None = None  # an output field; else ``expr`` over the source's columns
    expr: str | None = None
    descending: bool = False

    @property
    def column(self) -> str:
        """The column that holds the key: the field, or a hidden computed column."""
        return self.field if self.field is not None else f"__group_{self.name}"


@dataclass(frozen=True)
class Variable:
    """An aggregate over the rows of each group at ``reset`` (or of the whole report)."""

    name: str
    function: str
    field: str | None = None  # None only for count: rows
    reset: str = "report"  # "report" or a group's name
    running: bool = False  # also add the running value to every row


@dataclass(frozen=True)
class Chart:
    """Points of ``y`` against ``x``: aggregated per bucket of x, or (``agg="none"``) the
    raw series downsampled to at most ``points``."""

    name: str
    x: str
    y: str | None  # None only for agg count
    agg: str = "sum"
    bucket: str | float = "auto"  # a unit of BUCKET_UNITS, "auto", or a numeric bin width
    points: int = DEFAULT_CHART_POINTS
    series: str | None = None  # a field: one set of points per value


@dataclass(frozen=True)
class Output:
    typst: str | None = None
    pdf: str | None = None
    template: str | None = None
    pdf_max_rows: int = DEFAULT_PDF_MAX_ROWS
    detail: bool = True  # the built-in template shows detail rows
    # "preview": a template reads the first pdf_max_rows rows (and every group, the
    # totals and charts); "all": every row, at Typst's cost of seconds and GiB a million
    template_rows: str = "preview"


@dataclass(frozen=True)
class PipelineSettings:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int | None = None  # None: one per core
    memory_limit: int | None = None  # bytes; None: what the machine or cgroup allows
    timezone: str = "UTC"
    source_memory: int = DEFAULT_SOURCE_MEMORY  # bytes DuckDB may use for the query


@dataclass(frozen=True)
class Report:
    path: str  # the YAML file ("<dict>" when built from a mapping)
    name: str
    source: Source
    title: str | None = None
    params: tuple[Param, ...] = ()
    param_values: Mapping[str, Any] = field(default_factory=dict)
    fields: tuple[Field, ...] = ()
    output: Output = Output()
    pipeline: PipelineSettings = PipelineSettings()
    groups: tuple[Group, ...] = ()
    variables: tuple[Variable, ...] = ()
    charts: tuple[Chart, ...] = ()

    @property
    def analysed(self) -> bool:
        """Whether the stream computes groups, variables or charts besides the rows."""
        return bool(self.groups or self.variables or self.charts)


def load_report(path: str | os.PathLike, params: Mapping[str, Any] | None = None) -> Report:
    """Read and validate a report definition.

    Args:
        path: the YAML file; paths inside it are relative to its folder.
        params: values for the report's ``params``; strings are parsed by the declared
            type (so command-line ``k=v`` pairs can be passed as they are).

    Raises:
        ReportError: naming the file, the key and what is expected.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{file}: no such report file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: cannot read the report: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ReportError(f"{file}: not valid YAML: {exc}") from None
    return report_from_mapping(data, str(file), file.resolve().parent, params)


def report_from_mapping(
    data: object,
    where: str = "<dict>",
    base_dir: Path | None = None,
    params: Mapping[str, Any] | None = None,
) -> Report:
    """Validate an already parsed definition; ``base_dir`` anchors relative paths."""
    return _Parser(where, base_dir or Path.cwd()).report(data, params or {})


def parse_size(value: object, where: str = "value") -> int:
    """``"1GiB"``, ``"512 MB"``, ``1073741824`` → bytes."""
    if isinstance(value, bool):
        raise ReportError(f"{where}: expected a size such as 512MiB or 2GB, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    match = SIZE_RE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ReportError(f"{where}: expected a size such as 512MiB or 2GB, got {value!r}")
    number, unit = match.groups()
    size = int(float(number) * SIZE_UNITS[(unit or "b").lower()])
    if size <= 0:
        raise ReportError(f"{where}: a size must be positive, got {value!r}")
    return size


def parse_param(param: Param, value: Any, where: str) -> Any:
    """Check or parse one parameter value against its declared type."""
    kind = param.type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
        elif kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value)
        elif kind == "float":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value)
        elif kind == "str":
            if isinstance(value, str):
                return value
        elif kind == "date":
            if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
                return value
            if isinstance(value, str):
                return dt.date.fromisoformat(value)
        elif kind == "datetime":
            if isinstance(value, dt.datetime):
                return value
            if isinstance(value, dt.date):
                return dt.datetime(value.year, value.month, value.day)
            if isinstance(value, str):
                return dt.datetime.fromisoformat(value)
    except ValueError:
        pass
    raise ReportError(f"{where}: parameter {param.name!r} expects a {kind}, got {value!r}")


class _Parser:
    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir

    def fail(self, key: str, message: str) -> ReportError:
        return ReportError(f"{self.file}: {key}: {message}")

    def mapping(self, value: object, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key != "(top level)" else str(name)
                raise self.fail(
                    where, f"unknown key; expected one of: {', '.join(sorted(allowed))}"
                )
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value

    def report(self, data: object, overrides: Mapping[str, Any]) -> Report:
        if data is None:
            raise self.fail(
                "(top level)", "the file is empty; a report needs at least name and source"
            )
        top = self.mapping(
            data,
            "(top level)",
            {
                "name",
                "title",
                "source",
                "params",
                "fields",
                "output",
                "pipeline",
                "groups",
                "variables",
                "charts",
            },
        )
        if "name" not in top:
            raise self.fail("name", "missing; every report needs a name (letters, digits, _ and -)")
        name = self.string(top["name"], "name")
        if not NAME_RE.match(name):
            raise self.fail("name", f"{name!r} is not an identifier (letters, digits, _ and -)")
        title = top.get("title")
        if title is not None:
            title = self.string(title, "title")
        if "source" not in top:
            raise self.fail("source", "missing; give source.parquet or source.duckdb")
        params = self.params(top.get("params"))
        fields = self.fields(top.get("fields"))
        groups = self.groups(top.get("groups"))
        variables = self.variables(top.get("variables"), groups)
        charts = self.charts(top.get("charts"))
        self.check_names(fields, groups, variables, charts)
        return Report(
            path=self.file,
            name=name,
            title=title,
            source=self.source(top["source"]),
            params=params,
            param_values=self.param_values(params, overrides),
            fields=fields,
            output=self.output(top.get("output")),
            pipeline=self.pipeline(top.get("pipeline")),
            groups=groups,
            variables=variables,
            charts=charts,
        )

    # ---- source

    def source(self, value: object) -> Source:
        src = self.mapping(
            value, "source", {"parquet", "duckdb", "where", "order_by", "count_rows", "sorted"}
        )
        if ("parquet" in src) == ("duckdb" in src):
            raise self.fail("source", "give exactly one of source.parquet and source.duckdb")
        where = src.get("where")
        if where is not None:
            where = self.string(where, "source.where")
        order_by = self.string_list(src.get("order_by", []), "source.order_by")
        count_rows = self.flag(src, "count_rows", "source")
        flags = {"count_rows": count_rows, "sorted": self.flag(src, "sorted", "source")}
        if "parquet" in src:
            files = self.parquet_files(src["parquet"])
            return Source(parquet=files, where=where, order_by=order_by, **flags)
        db = self.mapping(src["duckdb"], "source.duckdb", {"database", "query"})
        if "query" not in db:
            raise self.fail("source.duckdb.query", "missing; give the SQL that produces the rows")
        query = self.string(db["query"], "source.duckdb.query")
        database = None
        if db.get("database") is not None:
            path = self.path(self.string(db["database"], "source.duckdb.database"))
            if not path.is_file():
                raise self.fail("source.duckdb.database", f"no such database file: {path}")
            database = str(path)
        return Source(database=database, query=query, where=where, order_by=order_by, **flags)

    def string_list(self, value: object, key: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key, f"expected a string or a list of strings, got {_kind(value)}")
        return tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(items))

    def path(self, text: str) -> Path:
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else self.base_dir / path

    def parquet_files(self, value: object) -> tuple[str, ...]:
        files: list[str] = []
        for i, pattern in enumerate(self.string_list(value, "source.parquet")):
            key = "source.parquet" if isinstance(value, str) else f"source.parquet[{i}]"
            path = self.path(pattern)
            if path.is_dir():
                found = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True))
                if not found:
                    raise self.fail(key, f"the directory {path} holds no .parquet files")
            elif glob.has_magic(pattern):
                found = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
                if not found:
                    raise self.fail(key, f"no file matches {str(path)!r}")
            elif path.is_file():
                found = [str(path)]
            else:
                raise self.fail(key, f"no such Parquet file: {path}")
            files += found
        if not files:
            raise self.fail("source.parquet", "expected at least one file, glob or directory")
        return tuple(files)

    # ---- params

    def params(self, value: object) -> tuple[Param, ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise self.fail("params", f"expected a mapping of parameter names, got {_kind(value)}")
        params = []
        for name, spec in value.items():
            key = f"params.{name}"
            if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise self.fail(key, "a parameter name must be a SQL identifier")
            spec = self.mapping(spec, key, {"type", "default", "required"})
            kind = spec.get("type")
            if kind not in PARAM_TYPES:
                raise self.fail(
                    f"{key}.type", f"expected one of {', '.join(PARAM_TYPES)}, got {kind!r}"
                )
            required = spec.get("required", False)
            if not isinstance(required, bool):
                raise self.fail(f"{key}.required", f"expected true or false, got {required!r}")
            param = Param(name, kind, required=required)
            if "default" in spec:
                default = parse_param(param, spec["default"], f"{self.file}: {key}.default")
                param = Param(name, kind, default, required)
            params.append(param)
        return tuple(params)

    def param_values(self, params: tuple[Param, ...], overrides: Mapping[str, Any]) -> dict:
        declared = {p.name: p for p in params}
        for name in overrides:
            if name not in declared:
                known = ", ".join(declared) or "none are declared"
                raise ReportError(
                    f"{self.file}: params: unknown parameter {name!r} (declared: {known})"
                )
        values = {}
        for p in params:
            if p.name in overrides:
                values[p.name] = parse_param(p, overrides[p.name], f"{self.file}: params.{p.name}")
            elif p.default is not None:
                values[p.name] = p.default
            elif p.required:
                raise ReportError(
                    f"{self.file}: params.{p.name}: required and not given "
                    f"(pass --param {p.name}=VALUE)"
                )
            else:
                values[p.name] = None
        return values

    # ---- fields, output, pipeline

    def fields(self, value: object) -> tuple[Field, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not value:
            raise self.fail("fields", f"expected a non-empty list of fields, got {_kind(value)}")
        fields = []
        for i, item in enumerate(value):
            key = f"fields[{i}]"
            if isinstance(item, str):
                fields.append(Field(self.string(item, key), column=item))
                continue
            spec = self.mapping(item, key, {"name", "column", "expr"})
            if "name" not in spec:
                raise self.fail(f"{key}.name", "missing; every field needs a name")
            name = self.string(spec["name"], f"{key}.name")
            if ("column" in spec) == ("expr" in spec):
                if "column" not in spec:
                    fields.append(Field(name, column=name))
                    continue
                raise self.fail(key, "give either column or expr, not both")
            if "column" in spec:
                fields.append(Field(name, column=self.string(spec["column"], f"{key}.column")))
            else:
                fields.append(Field(name, expr=self.string(spec["expr"], f"{key}.expr")))
        names = [f.name for f in fields]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise self.fail(f"fields[{i}].name", f"{name!r} is used twice")
        return tuple(fields)

    # ---- groups, variables, charts

    def items(self, value: object, key: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"expected a non-empty list, got {_kind(value)}")
        return value

    def identifier(self, spec: dict, key: str) -> str:
        if "name" not in spec:
            raise self.fail(f"{key}.name", "missing")
        name = self.string(spec["name"], f"{key}.name")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise self.fail(f"{key}.name", f"{name!r} is not an identifier (letters, digits, _)")
        return name

    def choice(self, spec: dict, name: str, key: str, choices: tuple, default: object) -> Any:
        value = spec.get(name, default)
        if value not in choices:
            expected = ", ".join(map(str, choices))
            raise self.fail(f"{key}.{name}", f"expected one of {expected}, got {value!r}")
        return value

    def optional_string(self, spec: dict, name: str, key: str) -> str | None:
        value = spec.get(name)
        return self.string(value, f"{key}.{name}") if value is not None else None

    def flag(self, spec: dict, name: str, key: str, default: bool = False) -> bool:
        value = spec.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key}.{name}", f"expected true or false, got {value!r}")
        return value

    def groups(self, value: object) -> tuple[Group, ...]:
        groups = []
        for i, item in enumerate(self.items(value, "groups")):
            key = f"groups[{i}]"
            spec = self.mapping(item, key, {"name", "field", "expr", "order"})
            name = self.identifier(spec, key)
            if name == "report":
                raise self.fail(f"{key}.name", "'report' is reserved for the report-level scope")
            if ("field" in spec) == ("expr" in spec):
                raise self.fail(key, "give exactly one of field and expr")
            order = self.choice(spec, "order", key, ("asc", "desc"), "asc")
            field_name = self.optional_string(spec, "field", key)
            expr = self.optional_string(spec, "expr", key)
            groups.append(Group(name, field_name, expr, order == "desc"))
        return tuple(groups)

    def variables(self, value: object, groups: tuple[Group, ...]) -> tuple[Variable, ...]:
        variables = []
        scopes = ["report"] + [g.name for g in groups]
        for i, item in enumerate(self.items(value, "variables")):
            key = f"variables[{i}]"
            spec = self.mapping(item, key, {"name", "function", "field", "reset", "running"})
            name = self.identifier(spec, key)
            function = self.choice(spec, "function", key, FUNCTIONS, None)
            field_name = self.optional_string(spec, "field", key)
            if field_name is None and function != "count":
                raise self.fail(f"{key}.field", f"missing; {function} needs a field")
            reset = spec.get("reset", "report")
            if reset not in scopes:
                raise self.fail(
                    f"{key}.reset",
                    f"unknown group {reset!r}; expected report or one of the groups' names "
                    f"({', '.join(scopes[1:]) or 'no groups are defined'})",
                )
            running = self.flag(spec, "running", key)
            if running and function not in RUNNING_FUNCTIONS:
                raise self.fail(
                    f"{key}.running",
                    f"a running {function} is not supported; running works with "
                    f"{', '.join(RUNNING_FUNCTIONS)}",
                )
            variables.append(Variable(name, function, field_name, reset, running))
        return tuple(variables)

    def charts(self, value: object) -> tuple[Chart, ...]:
        charts = []
        allowed = {"name", "x", "y", "agg", "bucket", "points", "series"}
        for i, item in enumerate(self.items(value, "charts")):
            key = f"charts[{i}]"
            spec = self.mapping(item, key, allowed)
            name = self.identifier(spec, key)
            if "x" not in spec:
                raise self.fail(f"{key}.x", "missing; give the field for the horizontal axis")
            x = self.string(spec["x"], f"{key}.x")
            agg = self.choice(spec, "agg", key, CHART_AGGS, "sum")
            y = self.optional_string(spec, "y", key)
            if y is None and agg != "count":
                raise self.fail(f"{key}.y", f"missing; agg {agg} needs a y field")
            bucket = spec.get("bucket", "auto")
            numeric = isinstance(bucket, int | float) and not isinstance(bucket, bool)
            if not (bucket == "auto" or bucket in BUCKET_UNITS or (numeric and bucket > 0)):
                raise self.fail(
                    f"{key}.bucket",
                    f"expected auto, one of {', '.join(BUCKET_UNITS)} or a positive bin "
                    f"width, got {bucket!r}",
                )
            if agg == "none" and bucket != "auto":
                raise self.fail(f"{key}.bucket", "agg none downsamples the raw series; drop bucket")
            points = spec.get("points", DEFAULT_CHART_POINTS)
            if not isinstance(points, int) or isinstance(points, bool) or points < 3:
                raise self.fail(f"{key}.points", f"expected a whole number >= 3, got {points!r}")
            series = self.optional_string(spec, "series", key)
            charts.append(Chart(name, x, y, agg, bucket, points, series))
        return tuple(charts)

    def check_names(self, fields, groups, variables, charts) -> None:
        """Names are unique per kind; references name declared fields, when there are."""
        for kind, items in (("groups", groups), ("variables", variables), ("charts", charts)):
            names = [item.name for item in items]
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise self.fail(f"{kind}[{i}].name", f"{name!r} is used twice")
        field_names = [f.name for f in fields]
        for i, v in enumerate(variables):
            if v.running and v.name in field_names:
                raise self.fail(
                    f"variables[{i}].name",
                    f"a running variable adds a column to every row, and {v.name!r} is "
                    "already a field",
                )
        if not fields:
            return  # the source's columns are checked when it is opened
        references = [(f"groups[{i}].field", g.field) for i, g in enumerate(groups)]
        references += [(f"variables[{i}].field", v.field) for i, v in enumerate(variables)]
        for i, c in enumerate(charts):
            references += [(f"charts[{i}].{a}", getattr(c, a)) for a in ("x", "y", "series")]
        for key, name in references:
            if name is not None and name not in field_names:
                raise self.fail(
                    key, f"{name!r} is not a field of the report (fields: {', '.join(field_names)})"
                )

    def output(self, value: object) -> Output:
        if value is None:
            return Output()
        spec = self.mapping(
            value,
            "output",
            {"typst", "pdf", "template", "pdf_max_rows", "detail", "template_rows"},
        )
        paths = {}
        for key in ("typst", "pdf", "template"):
            if spec.get(key) is not None:
                paths[key] = str(self.path(self.string(spec[key], f"output.{key}")))
        if "template" in paths and not Path(paths["template"]).is_file():
            raise self.fail("output.template", f"no such template file: {paths['template']}")
        max_rows = spec.get("pdf_max_rows", DEFAULT_PDF_MAX_ROWS)
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
            raise self.fail(
                "output.pdf_max_rows", f"expected a whole number >= 0, got {max_rows!r}"
            )
        detail = self.flag(spec, "detail", "output", default=True)
        template_rows = self.choice(spec, "template_rows", "output", ("preview", "all"), "preview")
        return Output(pdf_max_rows=max_rows, detail=detail, template_rows=template_rows, **paths)

    def pipeline(self, value: object) -> PipelineSettings:
        if value is None:
            return PipelineSettings()
        spec = self.mapping(
            value,
            "pipeline",
            {"chunk_size", "workers", "memory_limit", "timezone", "source_memory"},
        )
        chunk_size = spec.get("chunk_size", DEFAULT_CHUNK_SIZE)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise self.fail(
                "pipeline.chunk_size", f"expected a whole number >= 1, got {chunk_size!r}"
            )
        workers = spec.get("workers", "auto")
        if workers == "auto":
            workers = None
        elif not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise self.fail(
                "pipeline.workers", f"expected auto or a whole number >= 1, got {workers!r}"
            )
        memory_limit = None
        if spec.get("memory_limit") is not None:
            memory_limit = parse_size(spec["memory_limit"], f"{self.file}: pipeline.memory_limit")
        timezone = self.string(spec.get("timezone", "UTC"), "pipeline.timezone")
        try:
            ZoneInfo(timezone)
        except (ValueError, KeyError):
            raise self.fail(
                "pipeline.timezone", f"unknown time zone {timezone!r}; use an IANA name such as UTC"
            ) from None
        source_memory = DEFAULT_SOURCE_MEMORY
        if spec.get("source_memory") is not None:
            source_memory = parse_size(
                spec["source_memory"], f"{self.file}: pipeline.source_memory"
            )
        return PipelineSettings(chunk_size, workers, memory_limit, timezone, source_memory)


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return f"{type(value).__name__} {value!r}"


def with_params(report: Report | str | os.PathLike, params: Mapping[str, Any] | None) -> Report:
    """``report`` (or the report at that path) with ``params`` set, checked."""
    if not isinstance(report, Report):
        return load_report(report, params)
    if not params:
        return report
    declared = {p.name: p for p in report.params}
    values = dict(report.param_values)
    for name, value in params.items():
        if name not in declared:
            raise ReportError(f"{report.path}: params: unknown parameter {name!r}")
        values[name] = parse_param(declared[name], value, f"{report.path}: params.{name}")
    return dataclasses.replace(report, param_values=values)
