"""What a report's SQL may do: read its sources, and nothing else.

A report definition is a query, not a script. Its SQL reaches DuckDB in two ways, and
both are checked before anything runs:

- ``source.duckdb.query`` must be exactly one read-only statement (SELECT, WITH,
  VALUES, FROM …), not COPY, ATTACH, INSTALL, SET, PRAGMA or a second statement.
- ``source.where``, ``fields[].expr``, ``groups[].expr`` and ``source.order_by`` are
  pasted into the statement ashstream builds, so each must be one expression (an
  order_by entry: one sort key), parsed on its own: no ``;``, no unbalanced
  parenthesis that would close ours, no clause of its own.

What is left, a SELECT, could still read any file DuckDB can reach (``read_csv``,
``read_text``, a view in the database) or load an extension. So the connection is
locked down before the first statement: external access off, file access only below
the report's folder, its Parquet files, the spill folder and what the report allows
(``source.allow_paths``, ``--allow-path``), and the configuration locked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from ashstream.errors import ReportError


def lock_down(con: Any, paths: Iterable[str]) -> None:
    """Let ``con`` touch only ``paths``: folders (and everything below them) and files;
    then lock its configuration, so that no statement can change a setting after this."""
    folders, files = set(), set()
    for path in map(os.path.abspath, paths):
        if os.path.isdir(path):
            folders.add(os.path.join(path, ""))  # a prefix: "/a/b" would allow "/a/bc"
        else:
            files.add(path)
    con.execute(f"SET allowed_directories = {_list_literal(sorted(folders))}")
    con.execute(f"SET allowed_paths = {_list_literal(sorted(files))}")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _list_literal(items: list[str]) -> str:
    return "[" + ", ".join(quote_literal(item) for item in items) + "]"


def embed(fragment: str) -> str:
    """A checked expression as it goes into the SQL: in parentheses, the closing one
    on a line of its own (after a ``--`` comment, it would otherwise be swallowed)."""
    return f"({closed(fragment)})"


def closed(fragment: str) -> str:
    """``fragment`` ending its own line, so that a trailing ``--`` comment in it cannot
    swallow what follows it in the SQL."""
    return fragment + "\n"


def check_query(con: Any, query: str, key: str, where: str) -> None:
    """``query`` must be one read-only statement (a SELECT of some form).

    Raises:
        ReportError: naming ``where`` (the report file) and ``key``.
    """
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ReportError(
            f"{where}: {key}: DuckDB cannot parse the query: {_first_line(exc)}"
        ) from None
    if len(statements) != 1:
        raise ReportError(
            f"{where}: {key}: expected one SELECT statement, got {len(statements)} "
            "statements; a report reads its source, it does not run scripts"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ReportError(
            f"{where}: {key}: expected a read-only query (SELECT, WITH, VALUES), got a "
            f"{kind.name} statement; a report may read its sources, never write, attach "
            "or change settings"
        )


def check_expression(con: Any, fragment: str, key: str, where: str) -> None:
    """``fragment`` must be exactly one SQL expression.

    Raises:
        ReportError: naming ``where`` and ``key``, when it is more or other.
    """
    node = _parse_select(con, f"SELECT {embed(fragment)}", fragment, key, where)
    alone = len(node.get("select_list", ())) == 1 and not node.get("modifiers")
    if not (alone and _nothing_but_select(node)):
        raise ReportError(
            f"{where}: {key}: expected one SQL expression, got {_shown(fragment)}; a "
            "clause or statement of its own cannot go here"
        )


def check_sort_key(con: Any, fragment: str, key: str, where: str) -> None:
    """``fragment`` must be one ORDER BY key: an expression, with ASC/DESC and NULLS
    FIRST/LAST at most.

    Raises:
        ReportError: naming ``where`` and ``key``, when it is more or other.
    """
    node = _parse_select(con, f"SELECT 1 ORDER BY {closed(fragment)}", fragment, key, where)
    modifiers = node.get("modifiers") or [{}]
    one_key = (
        len(modifiers) == 1
        and modifiers[0].get("type") == "ORDER_MODIFIER"
        and len(modifiers[0].get("orders", ())) == 1
    )
    if not (one_key and _nothing_but_select(node)):
        raise ReportError(
            f"{where}: {key}: expected one sort key (an expression, ASC or DESC), got "
            f"{_shown(fragment)}"
        )


def _parse_select(con: Any, sql: str, fragment: str, key: str, where: str) -> dict:
    """The one SELECT node DuckDB's parser makes of ``sql``, ``fragment`` in its place;
    runs nothing."""
    parsed = _serialized(con, sql)
    statements = parsed.get("statements") or []
    if parsed.get("error") or len(statements) != 1:
        # Said of the fragment alone: the error of the wrapped one may point at our ")".
        alone = _serialized(con, f"SELECT {fragment}")
        count = len(alone.get("statements") or [])
        if alone.get("error"):
            reason = f"DuckDB: {alone.get('error_message')}"
        elif count > 1:
            reason = f"{count} statements"
        else:
            reason = f"DuckDB: {parsed.get('error_message')}"
        raise ReportError(
            f"{where}: {key}: expected one SQL expression, got {_shown(fragment)} ({reason})"
        )
    node = statements[0].get("node", {})
    if node.get("type") != "SELECT_NODE":
        raise ReportError(f"{where}: {key}: expected one SQL expression, got {_shown(fragment)}")
    return node


def _serialized(con: Any, sql: str) -> dict:
    """DuckDB's parse of ``sql`` as JSON (``json_serialize_sql``): it parses, never runs."""
    [(result,)] = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    return json.loads(result)


def _nothing_but_select(node: dict) -> bool:
    """The SELECT has no FROM, WHERE, GROUP BY, HAVING, QUALIFY, sample or WITH."""
    return (
        (node.get("from_table") or {}).get("type") == "EMPTY"
        and node.get("where_clause") is None
        and not node.get("group_expressions")
        and node.get("having") is None
        and node.get("qualify") is None
        and node.get("sample") is None
        and not (node.get("cte_map") or {}).get("map")
    )


def _shown(fragment: str) -> str:
    """The fragment for a message: one line, bounded."""
    text = " ".join(fragment.split())
    return repr(text if len(text) <= 120 else text[:117] + "...")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
