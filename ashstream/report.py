"""The report definition: YAML into frozen, validated dataclasses. Runs nothing.

Every error names the file, the key path (``source.parquet``, ``fields[2].expr``) and
what was expected. Unknown keys are errors, so a typo never passes silently. Paths are
relative to the YAML file.

A bad file must fail fast, with exit code 2, never an internal error: the file's size
(MAX_REPORT_BYTES), its nesting (MAX_DEPTH, counted through aliases without expanding
them) and every count are bounded, a key given twice is refused, and an error shows a
user's value cut short (:func:`_show`), as an alias bomb expands to 10**9 items.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import os
import pickle
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from ashstream.analysis.protocol import Aggregate, installed_aggregates, load_factory
from ashstream.errors import ReportError

__all__ = [
    "BUCKET_UNITS",
    "MAX_CHUNK_SIZE",
    "MAX_WORKERS",
    "AggregateOptions",
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
    "option_items",
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
    "median",
    "quantile",
    "top",
    "mode",
)
QUANTILE_FUNCTIONS = ("median", "quantile")
QUANTILE_METHODS = ("exact", "sketch")
DEFAULT_RELATIVE_ERROR = 0.01
RELATIVE_ERROR_RANGE = (0.001, 0.5)  # finer needs ~10x the buckets per digit
DEFAULT_TOP_N = 5
MAX_TOP_N = 10_000
MAX_QUANTILES = 1000
# A running value is a prefix aggregate per row; these have one that is cheap and exact.
RUNNING_FUNCTIONS = ("count", "sum", "avg", "min", "max", "first", "last")
CHART_AGGS = ("sum", "count", "avg", "min", "max", "median", "quantile", "none")
BUCKET_UNITS = ("hour", "day", "week", "month", "quarter", "year")
DEFAULT_CHART_POINTS = 500
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# One run of spaces after the number: two adjacent ``\s*`` backtrack quadratically.
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT]i?B|B)\s*)?$", re.IGNORECASE)
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
# Caps on what a report may ask for: a huge number (10**30) passed here and failed deep
# in the engine. A chunk of 10M rows is GiBs already; the engine caps workers further
# by what the machine holds.
MAX_CHUNK_SIZE = 10_000_000
MAX_WORKERS = 1024
MAX_PDF_MAX_ROWS = 10**9
MAX_CHART_POINTS = 10**6
MAX_SIZE = 2**62  # bytes (4 EiB): a size past it overflows a 64-bit setting later
# A definition is KiBs of YAML, and PyYAML is slow on a dense file (1 MiB of [a, a, ...]
# took 14 s and 340 MB): this bounds a mistaken one, data passed as the report, to about
# a minute. 80k fields, one mapping each, are 3 MiB.
MAX_REPORT_BYTES = 4 * 2**20
MAX_DEPTH = 64  # levels of nesting; a report's own keys go 4 deep
MAX_SHOWN = 200  # characters of a path or name in a message


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
    # Files and folders the SQL may read besides the report's folder and its sources
    # (see ashstream.sql_guard); absolute.
    allow_paths: tuple[str, ...] = ()
    # Set by an engine, never by YAML: read only rows [first, last) of the one file.
    row_range: tuple[int, int] | None = None
    # Set by the cache (ashstream.cache), never by YAML: read these (file, row range or
    # None) one after another, each batch tagged with its unit; and the running
    # variables' state to start from, as (name, (key path, state)) pairs.
    units: tuple[tuple[str, tuple[int, int] | None], ...] = ()
    running_carry: tuple = ()
    first_row: int = 0  # the row number of the units' first row, in the whole source

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
class AggregateOptions:
    """What a function takes besides its field; each applies to the functions named."""

    q: float | tuple[float, ...] | None = None  # quantile; a tuple gives a list of results
    method: str = "exact"  # median, quantile: "exact" or "sketch"
    relative_error: float = DEFAULT_RELATIVE_ERROR  # method sketch
    interpolate: bool | None = None  # method exact; None: for floats only, as DuckDB
    n: int = DEFAULT_TOP_N  # top
    custom: tuple[tuple[str, Any], ...] = ()  # an installed aggregate's ``options``


@dataclass(frozen=True)
class Variable:
    """An aggregate over the rows of each group at ``reset`` (or of the whole report)."""

    name: str
    function: str
    field: str | None = None  # None only for count: rows
    reset: str = "report"  # "report" or a group's name
    running: bool = False  # also add the running value to every row
    options: AggregateOptions = AggregateOptions()
    fields: tuple[str, ...] = ()  # an aggregate over several fields (a struct per row)
    # A function not built in: the factory of its Aggregate (installed, or passed from
    # Python), called with ``options.custom``.
    factory: Any = None


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
    options: AggregateOptions = AggregateOptions()  # agg median or quantile


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
    cache: str | bool | None = None  # a folder, True: the default one (ashstream.cache)
    cache_max_size: int | None = None  # bytes; None: no bound


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
    # The folder relative paths are anchored to, and whose files the SQL may read.
    base_dir: str = field(default_factory=os.getcwd)

    @property
    def analysed(self) -> bool:
        """Whether the stream computes groups, variables or charts besides the rows."""
        return bool(self.groups or self.variables or self.charts)


def load_report(
    path: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    aggregates: Mapping[str, Any] | None = None,
) -> Report:
    """Read and validate a report definition.

    Args:
        path: the YAML file; paths inside it are relative to its folder.
        params: values for the report's ``params``; strings are parsed by the declared
            type (so command-line ``k=v`` pairs can be passed as they are).
        aggregates: factories of aggregates (:class:`ashstream.Aggregate`) by the name
            a variable's ``function`` gives, besides the installed ones.

    Raises:
        ReportError: naming the file, the key and what is expected.
    """
    file = Path(path)
    data = _read_yaml(file)
    return report_from_mapping(data, str(file), file.resolve().parent, params, aggregates)


def _read_yaml(file: Path) -> object:
    """The file's one YAML document, read as yaml.safe_load does, within MAX_REPORT_BYTES
    and :class:`_Loader`'s checks."""
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_REPORT_BYTES + 1)  # not all of a mistaken 100 GB file
    except FileNotFoundError:
        raise ReportError(f"{file}: no such report file") from None
    except OSError as exc:
        raise ReportError(f"{file}: cannot read the report: {exc}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise ReportError(
            f"{file}: the report is larger than {MAX_REPORT_BYTES // 2**20} MiB, the most a "
            "report definition may be"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(f"{file}: cannot read the report: {exc}") from None
    try:
        loader = _Loader(text, str(file))  # which may refuse a character already
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ReportError(f"{file}: not valid YAML: {_clip(str(exc), 5 * MAX_SHOWN)}") from None
    except RecursionError:  # MAX_DEPTH stops the composer long before: a last guard
        raise ReportError(f"{file}: not valid YAML: nested too deeply to read") from None
    except MemoryError:
        raise ReportError(f"{file}: the report does not fit in memory") from None


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing what it would take silently or fail on badly: a
    key given twice (it keeps the last), nesting deeper than MAX_DEPTH (its composer
    recurses: ``[`` 100000 times is a RecursionError), and a scalar its constructors
    reject with a bare ValueError, KeyError or AttributeError (``!!int x``, 2024-13-01).

    Nesting is counted as the document is composed, through aliases by the height of
    the node they name, so an alias bomb is measured in its nodes, not expanded."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.keys: list[object] = []  # the path to the node being composed: keys, indexes
        self.heights: list[int] = []  # per node being composed: its children's tallest
        self.anchor_heights: dict[str, int] = {}  # of anchored nodes composed in full

    def refuse(self, message: str) -> ReportError:
        where = ""
        for key in self.keys:
            if isinstance(key, int):
                where += f"[{key}]"
            elif key is not None:
                where += f".{key}" if where else str(key)
        return ReportError(f"{self.file}: {_clip(where) or '(top level)'}: {message}")

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # index: a list item's position, a value's key node, None for a key or the root
        if isinstance(index, yaml.ScalarNode):
            self.keys.append(_clip(index.value))
        else:
            self.keys.append("?" if isinstance(index, yaml.Node) else index)
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # an unknown alias is its error
            height = self.anchor_heights.get(event.anchor)
            line = event.start_mark.line + 1
            if height is None:
                raise self.refuse(
                    f"the alias *{_clip(event.anchor)} is inside the value it names (line {line})"
                )
            if len(self.heights) + height > MAX_DEPTH:
                raise self.refuse(
                    f"nested deeper than {MAX_DEPTH} levels through the alias "
                    f"*{_clip(event.anchor)} (line {line})"
                )
        else:
            if len(self.heights) == MAX_DEPTH:
                raise self.refuse(
                    f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})"
                )
            self.heights.append(0)
            node = super().compose_node(parent, index)
            height = self.heights.pop() + 1
            if event.anchor is not None:
                self.anchor_heights[event.anchor] = height
        if self.heights:
            self.heights[-1] = max(self.heights[-1], height)
        self.keys.pop()
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        """The mapping, refused if a key is given twice: checked here, before merges
        (``<<``) add keys, as an explicit key may override a merged one. Keys compare as
        written, with their resolved type: ``a`` and ``"a"`` are one key, ``1`` and
        ``0x1`` two."""
        node = super().compose_mapping_node(anchor)
        lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                first = lines.get((key.tag, key.value))
                if first is not None:
                    raise self.refuse(
                        f"the key {_show(key.value)} is given twice (lines {first} and {line})"
                    )
                lines[key.tag, key.value] = line
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (AttributeError, LookupError, ValueError) as exc:
            what = _show(node.value) if isinstance(node, yaml.ScalarNode) else "the value"
            detail = f": {exc}" if isinstance(exc, ValueError) else ""
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ReportError(
                f"{self.file}: not valid YAML: line {node.start_mark.line + 1}: cannot read "
                f"{what} as {tag}{detail}"
            ) from None


def report_from_mapping(
    data: object,
    where: str = "<dict>",
    base_dir: Path | None = None,
    params: Mapping[str, Any] | None = None,
    aggregates: Mapping[str, Any] | None = None,
) -> Report:
    """Validate an already parsed definition; ``base_dir`` anchors relative paths."""
    return _Parser(where, base_dir or Path.cwd(), aggregates).report(data, params or {})


def parse_size(value: object, where: str = "value") -> int:
    """``"1GiB"``, ``"512 MB"``, ``1073741824`` → bytes, at most MAX_SIZE."""
    match = SIZE_RE.match(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        size: float = value
    elif match:
        number, unit = match.groups()
        size = float(number) * SIZE_UNITS[(unit or "b").lower()]  # inf past 1e308
    else:
        raise ReportError(f"{where}: expected a size such as 512MiB or 2GB, got {_show(value)}")
    if size > MAX_SIZE:
        raise ReportError(
            f"{where}: a size must be at most 4 EiB (2**62 bytes), got {_show(value)}"
        )
    if int(size) <= 0:
        raise ReportError(f"{where}: a size must be positive, got {_show(value)}")
    return int(size)


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
    raise ReportError(
        f"{where}: parameter {_show(param.name)} expects a {kind}, got {_show(value)}"
    )


class _Parser:
    def __init__(
        self, file: str, base_dir: Path, aggregates: Mapping[str, Any] | None = None
    ) -> None:
        self.file = file
        self.base_dir = base_dir
        self.aggregates = aggregates

    def fail(self, key: str, message: str) -> ReportError:
        return ReportError(f"{self.file}: {key}: {message}")

    def mapping(self, value: object, key: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                where = f"{key}.{_segment(name)}" if key != "(top level)" else _segment(name)
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
            raise self.fail(
                "name", f"{_show(name)} is not an identifier (letters, digits, _ and -)"
            )
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
            base_dir=str(self.base_dir),
        )

    # ---- source

    def source(self, value: object) -> Source:
        src = self.mapping(
            value,
            "source",
            {"parquet", "duckdb", "where", "order_by", "count_rows", "sorted", "allow_paths"},
        )
        if ("parquet" in src) == ("duckdb" in src):
            raise self.fail("source", "give exactly one of source.parquet and source.duckdb")
        where = src.get("where")
        if where is not None:
            where = self.string(where, "source.where")
        order_by = self.string_list(src.get("order_by", []), "source.order_by")
        count_rows = self.flag(src, "count_rows", "source")
        flags = {
            "count_rows": count_rows,
            "sorted": self.flag(src, "sorted", "source"),
            "allow_paths": self.allow_paths(src.get("allow_paths", [])),
        }
        if "parquet" in src:
            files = self.parquet_files(src["parquet"])
            return Source(parquet=files, where=where, order_by=order_by, **flags)
        db = self.mapping(src["duckdb"], "source.duckdb", {"database", "query"})
        if "query" not in db:
            raise self.fail("source.duckdb.query", "missing; give the SQL that produces the rows")
        query = self.string(db["query"], "source.duckdb.query")
        database = None
        if db.get("database") is not None:
            key = "source.duckdb.database"
            path = self.path(self.string(db["database"], key), key)
            if not os.path.isfile(path):
                raise self.fail(key, f"no such database file: {_clip(str(path))}")
            database = str(path)
        return Source(database=database, query=query, where=where, order_by=order_by, **flags)

    def allow_paths(self, value: object) -> tuple[str, ...]:
        """The files and folders a report lets its SQL read besides its own folder."""
        paths = []
        for i, text in enumerate(self.string_list(value, "source.allow_paths")):
            key = f"source.allow_paths[{i}]"
            path = self.path(text, key)
            if not os.path.exists(path):
                raise self.fail(key, f"no such file or folder: {_clip(str(path))}")
            paths.append(os.path.abspath(path))
        return tuple(paths)

    def string_list(self, value: object, key: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key, f"expected a string or a list of strings, got {_kind(value)}")
        return tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(items))

    def path(self, text: str, key: str) -> Path:
        """``text`` from the YAML file's folder; checks on it then use os.path, whose
        isfile and isdir say False, not OSError, for a name too long to exist."""
        if "\0" in text:  # expanduser raises ValueError on it
            raise self.fail(key, "a path cannot hold a NUL character")
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else self.base_dir / path

    def parquet_files(self, value: object) -> tuple[str, ...]:
        files: list[str] = []
        for i, pattern in enumerate(self.string_list(value, "source.parquet")):
            key = "source.parquet" if isinstance(value, str) else f"source.parquet[{i}]"
            path = self.path(pattern, key)
            if os.path.isdir(path):
                found = sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True))
                if not found:
                    raise self.fail(
                        key, f"the directory {_clip(str(path))} holds no .parquet files"
                    )
            elif glob.has_magic(pattern):
                found = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
                if not found:
                    raise self.fail(key, f"no file matches {_clip(str(path))!r}")
            elif os.path.isfile(path):
                found = [str(path)]
            else:
                raise self.fail(key, f"no such Parquet file: {_clip(str(path))}")
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
            key = f"params.{_segment(name)}"
            if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise self.fail(key, "a parameter name must be a SQL identifier")
            spec = self.mapping(spec, key, {"type", "default", "required"})
            kind = spec.get("type")
            if kind not in PARAM_TYPES:
                raise self.fail(
                    f"{key}.type", f"expected one of {', '.join(PARAM_TYPES)}, got {_show(kind)}"
                )
            required = spec.get("required", False)
            if not isinstance(required, bool):
                raise self.fail(f"{key}.required", f"expected true or false, got {_show(required)}")
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
                known = _names(list(declared)) or "none are declared"
                raise ReportError(
                    f"{self.file}: params: unknown parameter {_show(name)} (declared: {known})"
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
        self.unique("fields", (f.name for f in fields))
        return tuple(fields)

    def unique(self, kind: str, names: Iterable[str]) -> None:
        """Each name once; by a dict, as searching the names before each took 80k fields
        50 s."""
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            j = first.setdefault(name, i)
            if j != i:
                raise self.fail(
                    f"{kind}[{i}].name", f"{_show(name)} is used twice (first by {kind}[{j}])"
                )

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
            raise self.fail(
                f"{key}.name", f"{_show(name)} is not an identifier (letters, digits, _)"
            )
        return name

    def choice(self, spec: dict, name: str, key: str, choices: tuple, default: object) -> Any:
        value = spec.get(name, default)
        if value not in choices:
            expected = ", ".join(map(str, choices))
            raise self.fail(f"{key}.{name}", f"expected one of {expected}, got {_show(value)}")
        return value

    def optional_string(self, spec: dict, name: str, key: str) -> str | None:
        value = spec.get(name)
        return self.string(value, f"{key}.{name}") if value is not None else None

    def flag(self, spec: dict, name: str, key: str, default: bool = False) -> bool:
        value = spec.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key}.{name}", f"expected true or false, got {_show(value)}")
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
        scopes = {"report", *(g.name for g in groups)}
        allowed = {"name", "function", "field", "fields", "reset", "running", "options"}
        allowed |= set(_OPTION_KEYS)
        for i, item in enumerate(self.items(value, "variables")):
            key = f"variables[{i}]"
            spec = self.mapping(item, key, allowed)
            name = self.identifier(spec, key)
            if "function" not in spec:
                raise self.fail(f"{key}.function", f"missing; expected one of {_functions()}")
            function = self.string(spec["function"], f"{key}.function")
            factory = None if function in FUNCTIONS else self.factory(function, key)
            field_name = self.optional_string(spec, "field", key)
            fields = self.string_list(spec["fields"], f"{key}.fields") if "fields" in spec else ()
            if fields and (factory is None or field_name is not None):
                raise self.fail(
                    f"{key}.fields",
                    "several fields are for an aggregate you write; give field instead"
                    if factory is None
                    else "give field or fields, not both",
                )
            if field_name is None and not fields and function != "count":
                raise self.fail(f"{key}.field", f"missing; {function} needs a field")
            reset = spec.get("reset", "report")
            if not isinstance(reset, str) or reset not in scopes:
                raise self.fail(
                    f"{key}.reset",
                    f"unknown group {_show(reset)}; expected report or one of the groups' "
                    f"names ({_names([g.name for g in groups]) or 'no groups are defined'})",
                )
            running = self.flag(spec, "running", key)
            if running and function not in RUNNING_FUNCTIONS:
                raise self.fail(
                    f"{key}.running",
                    f"a running {function} is not supported; running works with "
                    f"{', '.join(RUNNING_FUNCTIONS)}",
                )
            options = self.aggregate_options(spec, key, function, factory)
            variables.append(
                Variable(name, function, field_name, reset, running, options, fields, factory)
            )
        return tuple(variables)

    def factory(self, function: str, key: str) -> Any:
        """The factory of a function that is not built in: passed from Python, else an
        installed entry point; a YAML report cannot name code any other way."""
        try:
            factory = load_factory(function, self.aggregates)
        except Exception as e:  # the plugin's own import failed
            raise self.fail(
                f"{key}.function",
                f"the installed aggregate {_show(function)} failed to load: "
                f"{type(e).__name__}: {_clip(str(e))}",
            ) from None
        if factory is None:
            installed = sorted(installed_aggregates())
            raise self.fail(
                f"{key}.function",
                f"unknown function {_show(function)}; expected one of {_functions()}, or an "
                "aggregate installed under the entry point group ashstream.aggregates ("
                + (f"installed: {_names(installed)}" if installed else "none is installed")
                + ")",
            )
        return factory

    def aggregate_options(
        self, spec: dict, key: str, function: str, factory: Any, chart: bool = False
    ) -> AggregateOptions:
        """The options of ``function``; a key another function takes is an error that says
        which functions take it."""
        where = "agg" if chart else "function"
        for option, takers in _OPTION_KEYS.items():
            if option in spec and function not in takers:
                raise self.fail(
                    f"{key}.{option}",
                    f"{where} {function} takes no {option}; {option} is for "
                    + " and ".join(takers),
                )
        if "options" in spec and factory is None:
            raise self.fail(
                f"{key}.options", f"{function} is built in and takes no options mapping"
            )
        method = self.choice(spec, "method", key, QUANTILE_METHODS, "exact")
        if function == "quantile" and "q" not in spec:
            raise self.fail(f"{key}.q", "missing; give the quantile (0 to 1), or a list of them")
        q: float | tuple[float, ...] | None = 0.5 if function == "median" else None
        if "q" in spec:
            q = self.quantiles(spec["q"], f"{key}.q", single=chart)
        if "relative_error" in spec and method != "sketch":
            raise self.fail(f"{key}.relative_error", "is for method: sketch")
        relative_error = spec.get("relative_error", DEFAULT_RELATIVE_ERROR)
        low, high = RELATIVE_ERROR_RANGE
        if not _number(relative_error) or not low <= relative_error <= high:
            raise self.fail(
                f"{key}.relative_error",
                f"expected a number from {low} to {high}, got {_show(relative_error)}",
            )
        if "interpolate" in spec and method != "exact":
            raise self.fail(f"{key}.interpolate", "is for method: exact (a sketch never does)")
        interpolate = self.flag(spec, "interpolate", key) if "interpolate" in spec else None
        n = self.whole_number(spec.get("n", DEFAULT_TOP_N), f"{key}.n", 1, MAX_TOP_N)
        custom = self.custom_options(spec.get("options"), f"{key}.options", function, factory)
        return AggregateOptions(q, method, float(relative_error), interpolate, n, custom)

    def quantiles(self, value: object, key: str, single: bool) -> float | tuple[float, ...]:
        def one(q: object, where: str) -> float:
            if not _number(q) or not 0 <= q <= 1:
                raise self.fail(where, f"expected a number from 0 to 1, got {_show(q)}")
            return float(q)

        if not isinstance(value, list):
            return one(value, key)
        if single:
            raise self.fail(key, f"a chart's point is one value: give one q, got {_show(value)}")
        if not value or len(value) > MAX_QUANTILES:
            raise self.fail(key, f"expected 1 to {MAX_QUANTILES} quantiles, got {len(value):,}")
        return tuple(one(q, f"{key}[{j}]") for j, q in enumerate(value))

    def custom_options(
        self, value: object, key: str, function: str, factory: Any
    ) -> tuple[tuple[str, Any], ...]:
        """An installed aggregate's options: scalars and lists of them (kept hashable, as
        tuples), checked by making the aggregate once."""
        if factory is None:
            return ()
        options = {} if value is None else value
        if not isinstance(options, dict):
            raise self.fail(key, f"expected a mapping of option names, got {_kind(options)}")
        custom = []
        for name, option in options.items():
            plain = option if isinstance(option, list) else [option]
            if not all(o is None or isinstance(o, str | int | float | bool) for o in plain):
                raise self.fail(
                    f"{key}.{_segment(name)}",
                    f"expected a number, string, true/false or a list of them, got {_kind(option)}",
                )
            custom.append((str(name), tuple(option) if isinstance(option, list) else option))
        try:
            aggregate = factory(**dict(custom))
        except Exception as e:
            raise self.fail(
                key, f"the aggregate {_show(function)} refused them: {type(e).__name__}: {e}"
            ) from None
        where = key.rsplit(".", 1)[0] + ".function"
        if not isinstance(aggregate, Aggregate):
            raise self.fail(
                where,
                f"{_show(function)} gave a {type(aggregate).__name__}, not an "
                "ashstream.Aggregate; subclass it (it supplies check, held_bytes and reduce)",
            )
        try:
            pickle.dumps(factory)
        except Exception as e:  # a lambda or a local class: the worker processes need it
            raise self.fail(
                where,
                f"the aggregate {_show(function)} cannot be sent to the worker processes "
                f"({type(e).__name__}: {_clip(str(e))}); define it at the top level of a module",
            ) from None
        return tuple(custom)

    def charts(self, value: object) -> tuple[Chart, ...]:
        charts = []
        allowed = {"name", "x", "y", "agg", "bucket", "points", "series"}
        allowed |= {"q", "method", "relative_error", "interpolate"}
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
                    f"width, got {_show(bucket)}",
                )
            if agg == "none" and bucket != "auto":
                raise self.fail(f"{key}.bucket", "agg none downsamples the raw series; drop bucket")
            points = spec.get("points", DEFAULT_CHART_POINTS)
            points = self.whole_number(points, f"{key}.points", 3, MAX_CHART_POINTS)
            series = self.optional_string(spec, "series", key)
            options = self.aggregate_options(spec, key, agg, None, chart=True)
            charts.append(Chart(name, x, y, agg, bucket, points, series, options))
        return tuple(charts)

    def check_names(self, fields, groups, variables, charts) -> None:
        """Names are unique per kind; references name declared fields, when there are."""
        for kind, items in (("groups", groups), ("variables", variables), ("charts", charts)):
            self.unique(kind, (item.name for item in items))
        field_names = {f.name for f in fields}
        for i, v in enumerate(variables):
            if v.running and v.name in field_names:
                raise self.fail(
                    f"variables[{i}].name",
                    f"a running variable adds a column to every row, and {_show(v.name)} is "
                    "already a field",
                )
        if not fields:
            return  # the source's columns are checked when it is opened
        references = [(f"groups[{i}].field", g.field) for i, g in enumerate(groups)]
        references += [(f"variables[{i}].field", v.field) for i, v in enumerate(variables)]
        references += [
            (f"variables[{i}].fields[{j}]", name)
            for i, v in enumerate(variables)
            for j, name in enumerate(v.fields)
        ]
        for i, c in enumerate(charts):
            references += [(f"charts[{i}].{a}", getattr(c, a)) for a in ("x", "y", "series")]
        for key, name in references:
            if name is not None and name not in field_names:
                raise self.fail(
                    key,
                    f"{_show(name)} is not a field of the report "
                    f"(fields: {_names([f.name for f in fields])})",
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
                paths[key] = str(
                    self.path(self.string(spec[key], f"output.{key}"), f"output.{key}")
                )
        if "template" in paths and not os.path.isfile(paths["template"]):
            raise self.fail("output.template", f"no such template file: {_clip(paths['template'])}")
        max_rows = self.whole_number(
            spec.get("pdf_max_rows", DEFAULT_PDF_MAX_ROWS),
            "output.pdf_max_rows",
            0,
            MAX_PDF_MAX_ROWS,
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
            {
                "chunk_size",
                "workers",
                "memory_limit",
                "timezone",
                "source_memory",
                "cache",
                "cache_max_size",
            },
        )
        chunk_size = self.whole_number(
            spec.get("chunk_size", DEFAULT_CHUNK_SIZE), "pipeline.chunk_size", 1, MAX_CHUNK_SIZE
        )
        workers = spec.get("workers", "auto")
        if workers == "auto":
            workers = None
        else:
            workers = self.whole_number(workers, "pipeline.workers", 1, MAX_WORKERS, "auto or ")
        memory_limit = None
        if spec.get("memory_limit") is not None:
            memory_limit = parse_size(spec["memory_limit"], f"{self.file}: pipeline.memory_limit")
        timezone = self.string(spec.get("timezone", "UTC"), "pipeline.timezone")
        try:
            ZoneInfo(timezone)
        except (ValueError, KeyError, OSError):  # OSError: a folder of zones, "America"
            raise self.fail(
                "pipeline.timezone",
                f"unknown time zone {_show(timezone)}; use an IANA name such as UTC",
            ) from None
        source_memory = DEFAULT_SOURCE_MEMORY
        if spec.get("source_memory") is not None:
            source_memory = parse_size(
                spec["source_memory"], f"{self.file}: pipeline.source_memory"
            )
        cache = spec.get("cache")
        if isinstance(cache, str) and cache.strip():
            cache = str(self.path(cache, "pipeline.cache"))
        elif cache is not None and not isinstance(cache, bool):
            raise self.fail(
                "pipeline.cache", f"expected true, false or a folder, got {_kind(cache)}"
            )
        cache_max_size = None
        if spec.get("cache_max_size") is not None:
            cache_max_size = parse_size(
                spec["cache_max_size"], f"{self.file}: pipeline.cache_max_size"
            )
        return PipelineSettings(
            chunk_size, workers, memory_limit, timezone, source_memory, cache, cache_max_size
        )

    def whole_number(self, value: object, key: str, low: int, high: int, alt: str = "") -> int:
        """``value``, an int from ``low`` to ``high``; ``alt`` names another form allowed."""
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(key, f"expected {alt}a whole number >= {low}, got {_show(value)}")
        if value > high:
            raise self.fail(
                key, f"expected {alt}a whole number from {low} to {high:,}, got {_show(value)}"
            )
        return value


class _Repr(reprlib.Repr):
    """reprlib's bounds, tighter, and on ints too: past 4300 digits an int has no repr."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxtuple = self.maxlist = self.maxset = self.maxfrozenset = self.maxdict = 4
        self.maxstring = self.maxother = 80

    def repr_int(self, x: int, level: int) -> str:
        bits = x.bit_length()
        return super().repr_int(x, level) if bits <= 256 else f"<an integer of {bits:,} bits>"


_show = _Repr().repr  # a user's value in a message: the repr, cut short at every level


def _clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` (a path, a name) as it is, or its ends around an ellipsis past ``limit``."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def _segment(key: object) -> str:
    """A mapping's key as a step of a key path (``params.<key>``)."""
    return _clip(key) if isinstance(key, str) else _show(key)


# Which functions take each option key.
_OPTION_KEYS = {
    "q": ("quantile",),
    "method": QUANTILE_FUNCTIONS,
    "relative_error": QUANTILE_FUNCTIONS,
    "interpolate": QUANTILE_FUNCTIONS,
    "n": ("top",),
}


def option_items(function: str, options: AggregateOptions) -> dict[str, Any]:
    """The options ``function`` was given, by their YAML keys (for ``inspect`` and the
    module's ``meta``)."""
    if function in QUANTILE_FUNCTIONS:
        items: dict[str, Any] = {}
        if function == "quantile":
            items["q"] = list(options.q) if isinstance(options.q, tuple) else options.q
        items["method"] = options.method
        if options.method == "sketch":
            items["relative_error"] = options.relative_error
        elif options.interpolate is not None:
            items["interpolate"] = options.interpolate
        return items
    if function == "top":
        return {"n": options.n}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.custom}


def _functions() -> str:
    return ", ".join(FUNCTIONS)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _names(names: Sequence[str], shown: int = 10) -> str:
    """The first names, comma-separated, and how many more: 80k fields stay one line."""
    listed = ", ".join(_clip(name) for name in names[:shown])
    return listed if len(names) <= shown else f"{listed} and {len(names) - shown:,} more"


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return f"{type(value).__name__} {_show(value)}"


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
            raise ReportError(f"{report.path}: params: unknown parameter {_show(name)}")
        values[name] = parse_param(declared[name], value, f"{report.path}: params.{name}")
    return dataclasses.replace(report, param_values=values)


def with_allowed_paths(report: Report, paths: tuple[str | os.PathLike, ...]) -> Report:
    """``report`` whose SQL may also read ``paths`` (files or folders; ``--allow-path``).

    Raises:
        ReportError: a path that does not exist.
    """
    if not paths:
        return report
    added = []
    for path in paths:
        if not os.path.exists(path):
            raise ReportError(f"--allow-path: no such file or folder: {_clip(str(path))}")
        added.append(os.path.abspath(path))
    source = dataclasses.replace(report.source, allow_paths=(*report.source.allow_paths, *added))
    return dataclasses.replace(report, source=source)
