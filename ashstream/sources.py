"""Open the report's DuckDB query or Parquet files and read them as Arrow record batches.

Runs in a producer process, in the calling process (a small report, or the driver of
a Ray run), or in a Ray task reading one part of the Parquet files (which then
starts no pool). DuckDB starts threads as soon as it is used; ashstream never forks a
process that has used it (children start from a fork server that imports no DuckDB).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ashstream.analysis.aggregate import check_analysis, sample_rows
from ashstream.errors import ReportError, SourceError
from ashstream.procs import pid_alive
from ashstream.report import Report
from ashstream.sql_guard import (
    check_expression,
    check_query,
    check_sort_key,
    closed,
    embed,
    lock_down,
    quote_literal,
)

# DuckDB threads in the producer: the transformers need the cores; reading and ordering
# is a small part of the work.
# DuckDB's spill folders: ashstream-duckdb-<pid of the process using it>-<random>, so
# that the folders of a process that died (which no finally survives) can be found.
SPILL_PREFIX = "ashstream-duckdb-"
PRODUCER_DUCKDB_THREADS = 1
# What DuckDB says when sql_guard.lock_down keeps the report from a file.
NOT_ALLOWED = "file system operations are disabled by configuration"
UNIT_KEY = b"ashstream.unit"  # a batch's schema metadata: its unit (Source.units)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def base_relation_sql(report: Report) -> str:
    """The source before fields, where and order_by are applied."""
    src = report.source
    if src.parquet:
        files = ", ".join(quote_literal(p) for p in src.parquet)
        if src.row_range is None:
            return f"SELECT * FROM read_parquet([{files}])"
        # A part of one file: DuckDB skips the row groups outside the range (measured:
        # 100k rows of a 10M-row file in 8 ms, against 174 ms for the whole file).
        first, last = src.row_range
        return (
            f"SELECT * EXCLUDE (file_row_number) FROM read_parquet([{files}], "
            f"file_row_number = true) WHERE file_row_number >= {first} "
            f"AND file_row_number < {last}"
        )
    return closed(src.query.strip().rstrip(";"))


def has_order_by(report: Report) -> bool:
    """Whether the source's SQL sorts (groups or order_by, unless ``sorted``)."""
    return bool(report.groups or report.source.order_by) and not report.source.sorted


def parquet_parts(report: Report, min_rows: int) -> list[Report]:
    """The report's Parquet source cut into parts of whole row groups, each of at least
    ``min_rows`` rows (but the last of a file), in source order: the same report, each
    reading one file's row range. DuckDB reads files in the order given and a file's
    rows in order, so the parts' rows, one after another, are the source's rows."""
    parts = []
    for path in report.source.parquet:
        try:
            metadata = parquet_footer(path)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(
                f"{report.path}: source.parquet: {path} is not a readable Parquet file: {exc}"
            ) from None
        first = rows = 0
        for i in range(metadata.num_row_groups):
            rows += metadata.row_group(i).num_rows
            if rows - first >= min_rows or i == metadata.num_row_groups - 1:
                source = dataclasses.replace(
                    report.source, parquet=(path,), row_range=(first, rows), count_rows=False
                )
                parts.append(dataclasses.replace(report, source=source))
                first = rows
    return parts


def source_sql(report: Report) -> str:
    """The one SQL statement that reads the source (or, with ``row_range``, a part)."""
    src = report.source
    if report.fields:
        columns = [
            f"{quote_identifier(f.column)} AS {quote_identifier(f.name)}"
            if f.column is not None
            else f"{embed(f.expr)} AS {quote_identifier(f.name)}"
            for f in report.fields
        ]
    else:
        columns = ["*"]
    # A group given by an expression gets a hidden column, dropped before encoding.
    columns += [f"{embed(g.expr)} AS {quote_identifier(g.column)}" for g in report.groups if g.expr]
    sql = f"SELECT {', '.join(columns)} FROM ({base_relation_sql(report)}) AS source"
    if src.where:
        sql += f" WHERE {embed(src.where)}"
    # Groups are runs of equal keys, so the rows come ordered by the keys, outermost first
    # (unless the source says they already do: the collector then checks the keys).
    order = [quote_identifier(g.column) + (" DESC" if g.descending else "") for g in report.groups]
    order += [closed(term) for term in src.order_by]
    if order and has_order_by(report):
        sql += " ORDER BY " + ", ".join(order)
    return sql


def bound_params(sql: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that ``sql`` names as ``$name`` (DuckDB refuses extra ones)."""
    used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", sql))
    return {name: value for name, value in values.items() if name in used}


@dataclass
class OpenSource:
    schema: pa.Schema
    total_rows: int | None
    batches: Iterator[pa.RecordBatch]
    close: Callable[[], None]  # the connection and spill folder; also when never read


def open_source(
    report: Report,
    rows_per_batch: int,
    on_connect: Callable[[Any], None] | None = None,
    connection: Any = None,
    files_checked: bool = False,
) -> OpenSource:
    """Connect, check the fields against the source, and start streaming.

    ``on_connect`` receives the DuckDB connection as soon as it exists, so that another
    thread can interrupt a long query. ``connection``: a fresh in-memory connection made
    in advance (connecting costs ~12 ms, most of a warm stream's first chunk); a
    database file is attached to it. It then belongs to the stream. ``files_checked``:
    :func:`check_parquet_files` has passed already (:func:`parquet_head` runs it).

    Raises:
        ReportError: the SQL does not parse or bind, or a field names a missing column.
        SourceError: the source cannot be opened or read.
    """
    import duckdb

    src = report.source
    try:
        # Always a database of its own: DuckDB shares one instance per file in a process,
        # and the lock-down's settings belong to the instance; the file is attached.
        con = connection if connection is not None else duckdb.connect(":memory:")
        if src.database:
            con.execute(f"ATTACH {quote_literal(src.database)} AS source_db (READ_ONLY)")
            con.execute("USE source_db")
    except duckdb.Error as exc:
        raise SourceError(
            f"{report.path}: cannot open DuckDB database {src.database}: {exc}"
        ) from None
    # DuckDB spills a query bigger than source_memory (the sort of a grouped report)
    # here, not into a ".tmp" folder in the current directory.
    spill = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-")
    try:
        return _open(con, report, rows_per_batch, on_connect, spill, files_checked)
    except BaseException:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise


def _open(
    con: Any,
    report: Report,
    rows_per_batch: int,
    on_connect: Callable[[Any], None] | None,
    spill: str,
    files_checked: bool,
) -> OpenSource:
    import duckdb

    src = report.source
    if on_connect is not None:
        on_connect(con)
    if src.parquet and not files_checked:
        check_parquet_files(report)
    con.execute(f"SET threads = {PRODUCER_DUCKDB_THREADS}")
    con.execute("SET enable_progress_bar = false")  # it would draw on our terminal
    con.execute(f"SET memory_limit = '{report.pipeline.source_memory}B'")
    con.execute(f"SET temp_directory = {quote_literal(spill)}")
    lock_down(con, [report.base_dir, spill, *src.parquet, *src.allow_paths])
    check_sql(con, report)
    base = base_relation_sql(report)
    params = report.param_values
    sql = source_sql(report)
    # The SQL as built is one SELECT too: fragments checked one by one must not add up
    # to more (each is checked on its own, but the whole is what runs).
    for built in (base, sql):
        check_query(con, built, "source", report.path)
    _check_fields(con, report, base, params)
    reader = None
    try:
        relation = con.sql(sql, params=bound_params(sql, params))
        if src.units:
            schema = relation.limit(0).to_arrow_table().schema
    except duckdb.Error as exc:
        raise _query_error(report, exc, sql) from None
    total = _total_rows(con, report, sql, params)  # before the reader: one result at once
    if not src.units:  # the query's own schema: a LIMIT 0 query first costs ~6 ms more
        reader = _start_reading(relation, rows_per_batch, report)
        schema = reader.schema
    check_analysis(report, schema)

    def close() -> None:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)

    if src.units:
        batches = _read_units(con, report, rows_per_batch, close)
    else:
        batches = _read(reader, report, close)
    return OpenSource(schema, total, batches, close)


def check_sql(con: Any, report: Report) -> None:
    """The report's SQL is a query and its fragments expressions (:mod:`sql_guard`),
    checked with ``con``'s parser before any of it runs.

    Raises:
        ReportError: naming the key at fault.
    """
    src, where = report.source, report.path
    if src.query is not None:
        check_query(con, src.query, "source.duckdb.query", where)
    if src.where is not None:
        check_expression(con, src.where, "source.where", where)
    for i, term in enumerate(src.order_by):
        check_sort_key(con, term, f"source.order_by[{i}]", where)
    for i, f in enumerate(report.fields):
        if f.expr is not None:
            check_expression(con, f.expr, f"fields[{i}].expr", where)
    for i, g in enumerate(report.groups):
        if g.expr is not None:
            check_expression(con, g.expr, f"groups[{i}].expr", where)


def check_parquet_files(report: Report) -> None:
    """Every file must be readable Parquet with the first file's columns and types:
    DuckDB would otherwise cast a drifted column silently, or fail half-way through."""
    first_file, first = None, None
    for path in report.source.parquet:
        try:
            schema = parquet_footer(path).schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(
                f"{report.path}: source.parquet: {path} is not a readable Parquet file: {exc}"
            ) from None
        if first is None:
            _check_duckdb_reads_exactly(report, path, schema)
            first_file, first = path, schema
            continue
        if schema.names != first.names:
            raise SourceError(
                f"{report.path}: source.parquet: {path} has columns {schema.names}, but "
                f"{first_file} has {first.names}; the files of one source must share a schema"
            )
        for name, a, b in zip(first.names, first.types, schema.types, strict=True):
            if a != b:
                raise SourceError(
                    f"{report.path}: source.parquet: column {name!r} is {b} in {path} but {a} "
                    f"in {first_file}; cast it when writing the files, or read them with a "
                    "DuckDB query that casts"
                )


def _check_duckdb_reads_exactly(report: Report, path: str, schema: pa.Schema) -> None:
    """Refuse what DuckDB would read silently changed: a second column of the same
    name (renamed ``NAME_1``), or a decimal wider than DuckDB's 38 digits (read as a
    DOUBLE, losing digits)."""
    seen = set()
    for name in schema.names:
        if name in seen:
            raise SourceError(
                f"{report.path}: source.parquet: {path} has two columns named {name!r}; "
                "DuckDB would rename the second. Rename one when writing the file"
            )
        seen.add(name)
    for field in schema:
        wide = _wide_decimal(field.type)
        if wide is not None:
            raise SourceError(
                f"{report.path}: source.parquet: column {field.name!r} of {path} holds "
                f"{wide}, wider than DuckDB's 38 digits: DuckDB would read it as a DOUBLE "
                "and lose digits. Write it as decimal128 (precision <= 38), or as text"
            )


def _wide_decimal(kind: pa.DataType) -> pa.DataType | None:
    """A decimal of more than 38 digits in ``kind`` (or nested in it), or None."""
    if pa.types.is_decimal(kind) and kind.precision > 38:
        return kind
    for i in range(kind.num_fields):
        found = _wide_decimal(kind.field(i).type)
        if found is not None:
            return found
    return None


def _check_fields(con: Any, report: Report, base: str, params: Mapping[str, Any]) -> None:
    import duckdb

    try:
        columns = con.sql(base, params=bound_params(base, params)).columns
    except duckdb.Error as exc:
        raise _query_error(report, exc, base) from None
    for i, f in enumerate(report.fields):
        if f.column is not None and f.column not in columns:
            raise ReportError(
                f"{report.path}: fields[{i}]: the source has no column {f.column!r} "
                f"(it has: {', '.join(columns)})"
            )
    output = [f.name for f in report.fields] or columns
    for i, g in enumerate(report.groups):  # before the ORDER BY that names them fails
        if g.field is not None and g.field not in output:
            raise ReportError(
                f"{report.path}: groups[{i}].field: the source has no column {g.field!r} "
                f"(it has: {', '.join(output)})"
            )


def _query_error(report: Report, exc: Exception, sql: str) -> Exception:
    import duckdb

    first_line = str(exc).strip()
    if NOT_ALLOWED in first_line:
        return _not_allowed(report, exc)
    if isinstance(exc, duckdb.ParserException | duckdb.BinderException | duckdb.CatalogException):
        return ReportError(
            f"{report.path}: source: DuckDB cannot run the report's SQL: {first_line}\n  SQL: {sql}"
        )
    if isinstance(exc, duckdb.InvalidInputException) and "arameter" in first_line:
        return ReportError(f"{report.path}: params: {first_line}")
    return SourceError(f"{report.path}: source: {first_line}")


def _not_allowed(report: Report, exc: Exception) -> ReportError:
    """The report's SQL reached for a file outside what it may read (sql_guard)."""
    found = re.search(r'Cannot access (?:file|directory) "([^"]*)"', str(exc))
    what = found[1] if found else "a file"
    return ReportError(
        f"{report.path}: source: the report may not read {what}: a report reads only "
        f"files below its folder ({report.base_dir}) and its sources; to allow more, "
        "list the file or folder in source.allow_paths, or pass --allow-path"
    )


def _total_rows(con: Any, report: Report, sql: str, params: Mapping[str, Any]) -> int | None:
    """Rows the stream will yield, when that is cheap (or asked for with count_rows)."""
    src = report.source
    if src.parquet and not src.where:
        return parquet_row_count(report)
    if src.count_rows:
        count_sql = f"SELECT count(*) FROM ({sql}) AS counted"
        return con.sql(count_sql, params=bound_params(count_sql, params)).fetchall()[0][0]
    return None


def parquet_footer(path: str) -> Any:
    """The file's Parquet metadata (``pyarrow.parquet.FileMetaData``: rows, row groups,
    schema), read by pyarrow's reader itself: ``pyarrow.parquet`` imports every remote
    filesystem and ssl, ~13 ms of a small report's start, to read a local footer."""
    from pyarrow._parquet import ParquetReader

    with pa.OSFile(path) as file:
        reader = ParquetReader()
        reader.open(file)
        return reader.metadata


def parquet_row_count(report: Report, stop_above: int | None = None) -> int | None:
    """The rows of the report's Parquet files, from their footers alone (with a ``where``,
    an upper bound); None for another source, or a file that cannot be read (the read
    itself then reports it). With ``stop_above``, the count stops once it passes that
    (a directory of many files need not have every footer read)."""
    if not report.source.parquet:
        return None
    total = 0
    try:
        for path in report.source.parquet:
            total += parquet_footer(path).num_rows
            if stop_above is not None and total > stop_above:
                break
    except (OSError, pa.ArrowException):
        return None
    return total


def _read_alike(kind: pa.DataType) -> bool:
    """Whether pyarrow reads a Parquet column that it reads as ``kind`` as DuckDB does:
    the same Arrow type and values (no zone, unit or width of its own choosing)."""
    return (
        pa.types.is_integer(kind)
        or pa.types.is_float32(kind)
        or pa.types.is_float64(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_string(kind)
        or pa.types.is_date32(kind)
        or (pa.types.is_decimal128(kind) and kind.precision <= 38)
        or (pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz is None)
    )


def parquet_head(report: Report, rows: int) -> pa.RecordBatch | None:
    """The source's first ``rows`` rows as DuckDB's query would give them, read by
    pyarrow from the first row group; None unless that is sure and cheap.

    DuckDB's COPY writes row groups of 122,880 rows with one page per column, and
    DuckDB needs ~25 ms to give the first rows of one, pyarrow ~10 ms: a stream's first
    chunk need not wait for DuckDB. Only for a source that DuckDB reads as it is
    stored (Parquet without where, order, expressions or partition columns) whose
    columns are of types both read alike; the caller checks DuckDB's first rows
    against it all the same. Checks the files as :func:`open_source` does.

    Raises:
        SourceError, ReportError: as :func:`open_source` would, before any row.
    """
    src = report.source
    if (
        not src.parquet
        or src.where
        or src.units
        or src.row_range is not None
        or has_order_by(report)
        or any(f.expr is not None for f in report.fields)
        or any(g.expr is not None for g in report.groups)
        or any("=" in part for path in src.parquet for part in Path(path).parts)  # hive
    ):
        return None
    check_parquet_files(report)
    from pyarrow._parquet import ParquetReader

    try:
        with pa.OSFile(src.parquet[0]) as file:
            reader = ParquetReader()
            reader.open(file)
            metadata = reader.metadata
            if metadata.num_row_groups == 0 or metadata.row_group(0).num_rows < rows:
                return None
            stored = reader.schema_arrow
            wanted = [(f.name, f.column) for f in report.fields] or [(n, n) for n in stored.names]
            if len({n.lower() for n in stored.names}) < len(stored.names) or any(
                column not in stored.names for _, column in wanted
            ):
                return None  # DuckDB matches names without case; it says what is missing
            indices = sorted({stored.get_field_index(column) for _, column in wanted})
            batch = next(reader.iter_batches(rows, [0], indices))
            batch.validate(full=True)  # DuckDB refuses invalid UTF-8
    except (OSError, pa.ArrowException, StopIteration):
        return None  # DuckDB reads it, and reports what fails
    columns = [batch.column(column) for _, column in wanted]
    if batch.num_rows != rows or not all(_read_alike(c.type) for c in columns):
        return None
    head = pa.RecordBatch.from_arrays(columns, names=[name for name, _ in wanted])
    output = set(head.schema.names)
    if any(g.field not in output for g in report.groups):
        return None
    check_analysis(report, head.schema)
    return head


def _start_reading(relation: Any, rows_per_batch: int, report: Report) -> Any:
    """Run the (bound) query: DuckDB's Arrow stream of it, its first rows read.

    Raises:
        SourceError: reading its first rows failed.
    """
    import duckdb

    try:
        return relation.to_arrow_reader(batch_size=rows_per_batch)
    except (duckdb.Error, OSError, pa.ArrowException) as exc:
        raise _read_error(report, exc, 0) from None


def _read(reader: Any, report: Report, close: Callable[[], None]) -> Iterator[pa.RecordBatch]:
    import duckdb

    rows = 0
    try:
        for batch in reader:
            if batch.num_rows:
                rows += batch.num_rows
                yield batch
    except (duckdb.Error, OSError, pa.ArrowException) as exc:
        raise _read_error(report, exc, rows) from None
    finally:
        close()


def _read_error(report: Report, exc: Exception, rows: int) -> ReportError | SourceError:
    """What the user is told when reading fails after ``rows`` rows. Errors raised
    while DuckDB fills the Arrow stream arrive as Arrow's OSError."""
    if NOT_ALLOWED in str(exc):
        return _not_allowed(report, exc)
    return SourceError(
        f"{report.path}: source: reading failed after {rows} rows: {str(exc).strip()}"
    )


def unit_report(report: Report, index: int) -> Report:
    """The source restricted to its ``index``-th unit (``Source.units``)."""
    path, row_range = report.source.units[index]
    source = dataclasses.replace(
        report.source, parquet=(path,), row_range=row_range, units=(), running_carry=(), first_row=0
    )
    return dataclasses.replace(report, source=source)


def _read_units(
    con: Any, report: Report, rows_per_batch: int, close: Callable[[], None]
) -> Iterator[pa.RecordBatch]:
    """The batches of ``source.units`` (set by the cache), one unit after another on
    the one connection, each batch tagged with its unit's index (no batch spans two)."""
    try:
        for index in range(len(report.source.units)):
            part = unit_report(report, index)
            sql = source_sql(part)
            relation = con.sql(sql, params=bound_params(sql, report.param_values))
            tag = {UNIT_KEY: str(index).encode()}
            reader = _start_reading(relation, rows_per_batch, part)
            for batch in _read(reader, part, lambda: None):
                yield batch.replace_schema_metadata(tag)
    finally:
        close()


@dataclass
class SourceSample:
    """What ``validate`` and ``inspect`` learn without streaming: schema, cheap row
    count, the SQL, and the first rows."""

    schema: pa.Schema
    total_rows: int | None
    sql: str
    sample: pa.Table


def sample_source(report: Report, rows: int = 1000) -> SourceSample:
    """Open the source as a stream would, read its first ``rows`` rows, and close it.

    The sample's rows are those a stream would emit (running values added, computed
    group keys dropped), and the groups, variables and charts are computed over them
    once, so that what would fail in a run fails here.

    Runs in the calling process: use it only where no worker processes will be forked
    afterwards (the ``validate`` and ``inspect`` commands)."""
    source = open_source(report, rows)
    try:
        first = next(source.batches, None)
    finally:
        source.close()
    if first is None:
        first = pa.RecordBatch.from_pylist([], schema=source.schema)
    first = sample_rows(report, first)
    sample = pa.Table.from_batches([first])
    return SourceSample(sample.schema, source.total_rows, source_sql(report), sample)


def _spill_dirs() -> list[tuple[Path, int]]:
    """Our DuckDB spill folders in the temp directory, with the pid of their user: real
    folders of this user only (the temp directory is shared: anyone can plant a name)."""
    found = []
    for path in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        pid = path.name[len(SPILL_PREFIX) :].split("-")[0]
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if (
            pid.isdigit()
            and int(pid) < 2**31
            and stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.getuid()
        ):
            found.append((path, int(pid)))
    return found


def remove_spill_dirs_of(pid: int) -> None:
    """Remove the spill folders of process ``pid`` (this one, about to exit)."""
    for path, owner in _spill_dirs():
        if owner == pid:
            shutil.rmtree(path, ignore_errors=True)


def sweep_stale_spill_dirs() -> None:
    """Remove the spill folders of processes that died without removing them."""
    for path, owner in _spill_dirs():
        if not pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
