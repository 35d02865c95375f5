"""The ``ashstream`` command line; the only module that prints.

``ashstream run`` parses its options, hands the run to
:func:`ashstream.runner.run_report` and draws its progress and summary.

Exit codes: 0 ok, 1 error, 2 bad usage or report definition, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM). Every outcome of every command is mapped to one line and its
exit code in one place, :meth:`_Commands.invoke`: an ashstream error prints its message,
an unexpected exception prints ``Internal error: …`` and how to see the trace, which
goes to the debug log. Never a bare traceback, never click's ``Aborted!``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ashstream import __version__, profiling
from ashstream.encode import (
    EncodeOptions,
    encode_array,
    encode_rows,
    encode_rows_text,
    encoder_name,
    typst_type,
)
from ashstream.engines.inline import INLINE_MAX_ROWS
from ashstream.errors import (
    INTERNAL_ERROR_ADVICE,
    AshstreamError,
    Cancelled,
    ExitCode,
    SinkError,
    StatusError,
)
from ashstream.report import (
    MAX_CHUNK_SIZE,
    MAX_WORKERS,
    Chart,
    Variable,
    load_report,
    option_items,
    with_allowed_paths,
)
from ashstream.runner import RunProgress, RunStage, run_report
from ashstream.sources import sample_source
from ashstream.startup import skip_pandas_probe

stderr = Console(stderr=True, highlight=False)
logger = logging.getLogger(__name__)
ROWS_PER_PDF_PAGE = 40  # the built-in template's table at 8 pt on A4, measured
JSON_ERRORS = "ashstream.json"  # ctx.meta key: a command prints its error as JSON too
WRITTEN = "ashstream.written"  # ctx.meta key: the outputs a run has put in place
# Errors of writing output that are the machine's (or a closed stdout), not a bug: one line.
FULL_OR_FAILING_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF)


class _ClosedOutput(io.TextIOBase):
    """Standing in for a standard output the shell closed (``>&-``), which Python leaves
    as None: a command that needs it fails with one line, one that does not runs."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")

    def writable(self) -> bool:
        return True


class _Commands(click.Group):
    """click's group, with every command's failures reported in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise  # click's own (usage errors, --help), and a closed stdout, which it handles
        except KeyboardInterrupt:
            _fail(Cancelled("interrupted (Ctrl-C)", ExitCode.INTERRUPTED), ctx)
        except AshstreamError as exc:
            _fail(exc, ctx)
        except OSError as exc:
            if exc.errno not in FULL_OR_FAILING_DISK:
                logger.debug("internal error", exc_info=exc)
                _fail(exc, ctx)
            _fail(SinkError(f"cannot write the output: {exc.strerror}"), ctx)
        except Exception as exc:
            logger.debug("internal error", exc_info=exc)
            _fail(exc, ctx)


def _fail(exc: BaseException, ctx: click.Context) -> None:
    """One line on stderr (and a JSON object on stdout for ``--json``), then exit."""
    if isinstance(exc, Cancelled):
        written = ctx.meta.get(WRITTEN)
        outcome = f"{' and '.join(written)} had been written" if written else "nothing was written"
        stderr.print(f"Cancelled ({exc}): {outcome}.", markup=False)
        message, code = str(exc), int(exc.exit_code)
    elif isinstance(exc, AshstreamError):
        stderr.print(f"[bold red]Error:[/] {escape(str(exc))}", soft_wrap=True)
        message, code = str(exc), int(exc.exit_code)
    else:
        message = f"{type(exc).__name__}: {exc}. {INTERNAL_ERROR_ADVICE}"
        stderr.print(f"[bold red]Internal error:[/] {escape(message)}", soft_wrap=True)
        code = int(ExitCode.ERROR)
    if ctx.meta.get(JSON_ERRORS):
        with contextlib.suppress(OSError):  # stdout may be what failed
            click.echo(json.dumps({"error": message, "exit_code": code}))
    sys.exit(code)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        encoder = encoder_name()
    except AshstreamError as exc:
        _fail(exc, ctx)
    click.echo(f"ashstream, version {__version__} (encoder: {encoder})")
    ctx.exit()


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the encoder that runs (native or reference), then exit.",
)
def main() -> None:
    """Stream DuckDB queries and Parquet files into Typst values for reports."""
    skip_pandas_probe()
    encoder_name()  # a bad ASHSTREAM_ENCODER fails here, in one line, before any work


# Every command that opens the source takes it: the SQL may read these too.
ALLOW_PATH = click.option(
    "--allow-path",
    "allow_paths",
    multiple=True,
    type=click.Path(exists=True),
    metavar="PATH",
    help="A file or folder the report's SQL may read besides its own folder and sources; "
    "repeatable (see README: Security).",
)


def _parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--param")
        params[name.strip()] = value
    return params


@contextmanager
def _sigterm_cancels():
    """SIGTERM ends a run like Ctrl-C does (cleanly), with exit code 143."""

    def handler(signum, frame):
        raise Cancelled("terminated (SIGTERM)", ExitCode.TERMINATED)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1, max=MAX_CHUNK_SIZE),
    help="Rows per chunk (default: the report's, else 1000).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=MAX_WORKERS),
    help="Transformer processes (default: one per core).",
)
@click.option(
    "--param", "params", multiple=True, metavar="NAME=VALUE", help="A report parameter; repeatable."
)
@ALLOW_PATH
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="The Typst data module to write."
)
@click.option("--pdf", type=click.Path(dir_okay=False), help="Also compile a PDF to this path.")
@click.option(
    "--inline-rows",
    type=click.IntRange(min=0),
    help=f"Run a Parquet source of at most this many rows in this process, without "
    f"starting workers; 0: always start them (default: {INLINE_MAX_ROWS:,} on 2 cores, "
    "fewer on more; 0 when --workers is given).",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    help="local: processes of this machine (default); ray: tasks on a Ray cluster "
    "(pip install 'ashstream[ray]').",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="The Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, else "
    "a local Ray started for the run). Implies --engine ray.",
)
@click.option(
    "--cache",
    "cache_dir",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR]",
    help="Reuse what earlier runs computed of the unchanged parts of the source, and keep "
    "what this one computes, in DIR (default: $XDG_CACHE_HOME/ashstream).",
)
@click.option(
    "--cache-max-size",
    metavar="SIZE",
    help="The most the cache may hold, such as 20GiB; least recently used texts go first.",
)
@click.option("--no-progress", is_flag=True, help="No live progress display.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON summary on stdout and nothing else."
)
@click.option(
    "--memray",
    "memray_dir",
    type=click.Path(file_okay=False),
    help="Record every process's allocations with memray into this folder.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="Log messages of this level and above go to stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line, with telemetry fields.",
)
def run(
    report_path,
    chunk_size,
    workers,
    params,
    allow_paths,
    output,
    pdf,
    inline_rows,
    engine,
    ray_address,
    cache_dir,
    cache_max_size,
    no_progress,
    quiet,
    as_json,
    memray_dir,
    log_level,
    log_format,
) -> None:
    """Stream REPORT's source into a Typst data module (and a PDF)."""
    click.get_current_context().meta[JSON_ERRORS] = as_json
    if ray_address and engine == "local":
        raise click.BadParameter("--ray-address needs --engine ray", param_hint="--ray-address")
    if engine == "ray" or ray_address:
        if memray_dir:
            raise click.BadParameter(
                "--memray records local processes; it does not follow Ray tasks",
                param_hint="--memray",
            )
        if workers:
            raise click.BadParameter(
                "on Ray the cluster's CPUs are the workers", param_hint="--workers"
            )
        if inline_rows is not None:
            raise click.BadParameter(
                "a run on Ray never runs in this process", param_hint="--inline-rows"
            )
        engine = "ray"
    configure_logging(log_level, log_format)
    if memray_dir:
        profiling.prepare(memray_dir)
    quiet = quiet or as_json
    written = click.get_current_context().meta.setdefault(WRITTEN, [])  # for an interrupt
    with _sigterm_cancels(), profiling.tracked(memray_dir, "parent"):
        report = with_allowed_paths(load_report(report_path, _parse_params(params)), allow_paths)
        display = _Display(not (no_progress or quiet), quiet, report.name, written)
        with display:
            summary = run_report(
                report,
                output=output,
                pdf=pdf,
                chunk_size=chunk_size,
                engine=engine,
                workers=workers,
                inline_rows=inline_rows,
                ray_address=ray_address,
                profile_dir=memray_dir,
                progress=display,
                cache=(cache_dir or True) if cache_dir is not None else None,
                cache_max_size=cache_max_size,
            ).to_dict()
    if memray_dir:
        summary["profiles"] = _profiles(memray_dir, quiet)
    if as_json:
        click.echo(json.dumps(summary, default=str))  # decimals and dates as text
    elif not quiet:
        _print_summary(summary)


def _profiles(directory: str, quiet: bool) -> list[dict]:
    """The memray captures: a table of peaks, and flamegraphs of the parent and the
    transformer that used the most."""
    entries = profiling.captures(directory)
    parent = [e for e in entries if e["role"] == "parent"]
    workers = sorted(
        (e for e in entries if e["role"].startswith("transformer")),
        key=lambda e: e["peak_memory_bytes"],
    )
    for entry in parent[:1] + workers[-1:]:
        entry["flamegraph"] = profiling.flamegraph(entry["file"])
    if not quiet:
        from rich.table import Table
        from rich.text import Text

        table = Table("process", "pid", "peak memory", "allocations", "capture")
        for e in entries:
            table.add_row(
                *(
                    Text(c)
                    for c in (
                        e["role"],
                        str(e["pid"]),
                        f"{e['peak_memory_bytes'] / 2**20:,.1f} MiB",
                        f"{e['allocations']:,}",
                        e["file"],
                    )
                )
            )
        stderr.print(table)
        for e in entries:
            if "flamegraph" in e:
                stderr.print(f"Flamegraph: {e['flamegraph']}", markup=False)
            else:
                command = f"{sys.executable} -m memray flamegraph {e['file']}"
                stderr.print(f"To draw {e['role']}: {command}", markup=False, soft_wrap=True)
    return entries


def _print_summary(summary: dict) -> None:
    for line in summary["warnings"]:
        stderr.print(f"[yellow]Warning:[/] {line}", markup=True)
    stderr.print(
        f"{summary['rows']:,} rows in {summary['seconds']:.2f} s "
        f"({summary['rows_per_s']:,.0f} rows/s, {_engine_words(summary)}, "
        f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB)"
    )
    if summary["groups"]:
        stderr.print(f"{summary['groups']:,} groups")
    if summary["totals"]:
        totals = "; ".join(f"{name} {_total(value)}" for name, value in summary["totals"].items())
        stderr.print(f"Totals: {totals}", markup=False, soft_wrap=True)
    cache = summary.get("cache")
    if cache is not None:
        stderr.print(
            f"Cache: {cache['reused_rows']:,} rows reused, {cache['computed_rows']:,} computed "
            + ("(by units of the source)" if cache["mode"] == "units" else "(the whole result)")
        )
    outputs = summary["outputs"]
    stderr.print(f"Wrote {outputs['typst']}" + (f" and {outputs['pdf']}" if outputs["pdf"] else ""))


def _total(value: object) -> str:
    """A total as the summary line shows it: lists (quantiles, top values) plainly."""
    if isinstance(value, list):
        return ", ".join(
            f"{_total(v['value'])} ({v['count']:,})"
            if isinstance(v, dict) and v.keys() == {"value", "count"}
            else _total(v)
            for v in value
        )
    return str(value)


def _engine_words(summary: dict) -> str:
    if summary["engine"] == "inline":
        return "in this process"
    if summary["engine"] == "ray":
        return f"on Ray, {summary['workers']} CPUs, read on the {summary['read_on']}"
    return f"{summary['workers']} workers"


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; telemetry's structured fields included."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("event", "measurements", "metadata"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """ashstream's loggers to stderr: rich text (drawn above the progress display) or JSON."""
    logger = logging.getLogger("ashstream")
    logger.setLevel(level.upper())
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if fmt == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=stderr, show_path=False)
    logger.addHandler(handler)
    logger.propagate = False


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option(
    "--param", "params", multiple=True, metavar="NAME=VALUE", help="A report parameter; repeatable."
)
@ALLOW_PATH
def validate(report_path, params, allow_paths) -> None:
    """Check REPORT and its source without running it: exit 0 when a run can start.

    Reads the definition, opens the source, resolves the fields and their types, and
    encodes the first rows, so that a typo, a missing file, an SQL error or a column with
    no Typst form is found now rather than an hour into a run.
    """
    report, sample = _sample(report_path, params, allow_paths)
    encode_rows(sample.sample, options=EncodeOptions(timezone=report.pipeline.timezone))
    total = f"{sample.total_rows:,} rows" if sample.total_rows is not None else "rows not counted"
    stderr.print(
        f"OK: report {report.name!r} ({report_path}): {len(sample.schema)} fields, {total}",
        soft_wrap=True,
    )
    for line in _analysis_lines(report):
        stderr.print(line, markup=False, soft_wrap=True)


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option(
    "--param", "params", multiple=True, metavar="NAME=VALUE", help="A report parameter; repeatable."
)
@ALLOW_PATH
def inspect(report_path, params, allow_paths) -> None:
    """Show REPORT's source schema, the SQL it runs, each field's Typst form, and an
    estimate of the output's size."""
    from rich.table import Table
    from rich.text import Text

    report, sample = _sample(report_path, params, allow_paths)
    text, _ = encode_rows_text(
        sample.sample, options=EncodeOptions(timezone=report.pipeline.timezone)
    )
    out = Console(highlight=False)
    out.print(Text(f"{report.title or report.name} ({report_path})", style="bold"))
    out.print(f"SQL: {sample.sql}", markup=False)
    if report.param_values:
        params_text = ", ".join(f"{k}={v!r}" for k, v in report.param_values.items())
        out.print(f"Parameters: {params_text}", markup=False)
    table = Table("field", "Arrow type", "Typst", "first value")
    values = _first_values(sample.sample)
    for field in sample.schema:  # Text: type names and values hold [brackets], not markup
        cells = (field.name, str(field.type), typst_type(field.type), values.get(field.name, ""))
        table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    for line in _analysis_lines(report):
        out.print(line, markup=False)
    rows = sample.total_rows
    per_row = len(text) / sample.sample.num_rows if sample.sample.num_rows else 0
    if rows is None:
        out.print("Rows: not counted (set source.count_rows: true to count them first)")
    else:
        out.print(f"Rows: {rows:,}")
    if per_row:
        size = f"{per_row:,.0f} bytes a row in the first {sample.sample.num_rows:,} rows"
        if rows is not None:
            size += f"; the Typst module will be about {per_row * rows / 2**20:,.1f} MiB"
        out.print(f"Size: {size}")
    if rows is not None:
        shown = min(rows, report.output.pdf_max_rows)
        pages = 1 + -(-shown // ROWS_PER_PDF_PAGE)
        out.print(
            f"PDF (built-in template): {shown:,} rows shown, about {pages:,} pages "
            f"at ~{ROWS_PER_PDF_PAGE} rows a page"
        )


def _analysis_lines(report) -> list[str]:
    """The report's groups, variables and charts, a line each kind."""
    lines = []
    if report.groups:
        levels = [g.name + (" (desc)" if g.descending else "") for g in report.groups]
        lines.append("Groups: " + " > ".join(levels))
    if report.variables:
        described = [
            f"{v.name} = {v.function}({_arguments(v.field or ', '.join(v.fields), v)}) "
            f"per {v.reset}" + (", running" if v.running else "")
            for v in report.variables
        ]
        lines.append("Variables: " + "; ".join(described))
    if report.charts:
        described = [
            f"{c.name}: {c.y or 'rows'} by {c.x} "
            + ("downsampled" if c.agg == "none" else f"({_arguments(c.agg, c)} per {c.bucket})")
            + f", at most {c.points} points"
            for c in report.charts
        ]
        lines.append("Charts: " + "; ".join(described))
    return lines


def _arguments(first: str, spec: Variable | Chart) -> str:
    """``first`` and the options of a variable's function or a chart's agg."""
    function = getattr(spec, "function", None) or spec.agg
    options = [f"{k}={v}" for k, v in option_items(function, spec.options).items()]
    return ", ".join([first, *options] if first else options)


def _sample(report_path: str, params: tuple[str, ...], allow_paths: tuple[str, ...]):
    report = with_allowed_paths(load_report(report_path, _parse_params(params)), allow_paths)
    return report, sample_source(report)


def _first_values(sample) -> dict[str, str]:
    """Each field's first value as a Typst literal, shortened for a table cell."""
    if not sample.num_rows:
        return {}
    values = {}
    for name in sample.column_names:
        literal = encode_array(sample[name].slice(0, 1))[0].as_py()
        values[name] = literal if len(literal) <= 48 else literal[:45] + "…"
    return values


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON on stdout.")
@click.option("--all", "show_all", is_flag=True, help="Also show finished streams.")
def status(as_json, show_all) -> None:
    """List the ashstream runs of this user in progress on this machine."""
    from ashstream.engines.local.registry import running_pools
    from ashstream.status_files import runtime_dir_path
    from ashstream.stream_record import ACTIVE

    try:
        pools = running_pools()
    except OSError as exc:  # UntrustedDirectory, or a directory that cannot be read
        message = str(exc) if exc.strerror is None else f"{runtime_dir_path()}: {exc.strerror}"
        raise StatusError(f"cannot list the runs: {message}") from None
    for pool in pools:
        pool["processes"] = _pool_processes(pool["pid"])
        if not show_all:
            pool["streams"] = [s for s in pool["streams"] if s["status"] in ACTIVE]
    if as_json:
        click.echo(json.dumps(pools))
        return
    from rich.table import Table
    from rich.text import Text

    out = Console(highlight=False)
    for pool in pools:
        if pool["registry"] == "unreachable":
            out.print(
                f"Pool {pool['pid']}: its registry process is gone, so its streams cannot "
                "be listed; they run on.",
                markup=False,
            )
    if not any(pool["streams"] for pool in pools):
        if not any(pool["registry"] == "unreachable" for pool in pools):
            out.print("No ashstream runs in progress.")
        return
    table = Table("pid", "stream", "report", "status", "rows", "rows/s", "memory", "restarts")
    for pool in pools:
        for s in pool["streams"]:
            memory = s["memory_bytes"]
            cells = (
                str(pool["pid"]) + ("" if pool["engine"] == "local" else f" ({pool['engine']})"),
                s["id"],
                s["report"],
                s["status"],
                f"{s['rows']:,}" + (f" / {s['total_rows']:,}" if s["total_rows"] else ""),
                f"{s['rows_per_s']:,.0f}",
                f"{memory / 2**20:,.0f} MiB" if memory else "",
                str(s["restarts"]),
            )
            table.add_row(*(Text(cell) for cell in cells))
    out.print(table)
    for pool in pools:
        if (pool["streams"] or pool["registry"] == "unreachable") and pool["processes"]:
            named = ", ".join(f"{p['title']} (pid {p['pid']})" for p in pool["processes"])
            out.print(f"Pool {pool['pid']} processes: {named}", markup=False, soft_wrap=True)


@main.group(cls=_Commands)
def cache() -> None:
    """Show or empty the cache of ``run --cache``."""


CACHE_DIR = click.option(
    "--dir",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="The cache folder (default: $XDG_CACHE_HOME/ashstream).",
)


@cache.command("list")
@CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON on stdout.")
def cache_list(cache_dir, as_json) -> None:
    """List the cache's entries, least recently used first, its texts and their size."""
    import datetime as dt

    from ashstream.cache import CacheStore

    store = CacheStore(cache_dir).open()
    entries, texts = store.listing()
    total = sum(e.bytes for e in entries) + sum(texts.values())
    if as_json:
        rows = [
            {"entry": e.name, "bytes": e.bytes, "last_used": e.last_use, "text": e.text}
            for e in entries
        ]
        click.echo(
            json.dumps(
                {
                    "folder": str(store.root),
                    "entries": rows,
                    "texts": [{"text": n, "bytes": b} for n, b in texts.items()],
                    "bytes": total,
                }
            )
        )
        return
    out = Console(highlight=False)
    for entry in entries:
        when = dt.datetime.fromtimestamp(entry.last_use).isoformat(sep=" ", timespec="seconds")
        where = f"text {entry.text[:8]}" if entry.text else "unreadable"
        out.print(
            f"{entry.name[:16]}  {entry.bytes / 2**10:>8,.1f} KiB  {where}  last used {when}",
            markup=False,
        )
    for name, size in texts.items():
        out.print(f"text {name[:8]}  {size / 2**20:>10,.1f} MiB", markup=False)
    out.print(
        f"{len(entries):,} entries, {len(texts):,} texts, {total / 2**20:,.1f} MiB in {store.root}",
        markup=False,
    )


@cache.command("clear")
@CACHE_DIR
def cache_clear(cache_dir) -> None:
    """Remove every entry and text of the cache."""
    from ashstream.cache import CacheStore

    count, size = CacheStore(cache_dir).open().clear()
    stderr.print(f"Removed {count:,} entries ({size / 2**20:,.1f} MiB)", markup=False)


def _pool_processes(pool_pid: int) -> list[dict]:
    """The pool's children as ``ps`` names them (``ashstream: transformer 0 [pool N]``)."""
    import psutil

    try:
        children = psutil.Process(pool_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            title = " ".join(child.cmdline()).strip()  # setproctitle pads it
        except psutil.Error:
            continue  # gone meanwhile
        if title.startswith("ashstream: "):
            found.append({"pid": child.pid, "title": title.removeprefix("ashstream: ")})
    return found


def _status_line(step: RunProgress) -> str:
    rate = step.rows / step.elapsed_s if step.elapsed_s > 0 else 0.0
    if step.engine == "inline":
        return f"{rate:,.0f} rows/s · in this process"
    if step.engine == "ray":
        return f"{rate:,.0f} rows/s · Ray, {step.workers} CPUs"
    return (
        f"{rate:,.0f} rows/s · {step.memory_bytes / 2**20:,.0f} MiB · "
        f"{step.busy_workers}/{step.workers} transformers busy"
    )


class _Display:
    """What ``ashstream run`` shows of :func:`run_report`'s progress, and the outputs it
    has put in place (``written``, for the message of an interrupt). The live display
    runs from the engine's start to the stream's end; rich.progress is imported only
    when it is ``enabled``, as its import is felt in a small run."""

    def __init__(self, enabled: bool, quiet: bool, description: str, written: list[str]) -> None:
        self.enabled = enabled
        self.quiet = quiet  # no "Compiling…" line either
        self.description = description  # the bar's label: the report's name
        self.written = written
        self._progress: Any = None  # the rich Progress while it is drawn
        self._task: Any = None  # its one task

    def __call__(self, step: RunProgress) -> None:
        if step.stage is RunStage.STARTED and self.enabled:
            self._start()
        elif step.stage is RunStage.CHUNK_WRITTEN and self._progress is not None:
            self._progress.update(
                self._task, completed=step.rows, total=step.total_rows, status=_status_line(step)
            )
        elif step.stage is RunStage.STREAM_ENDED:
            self.close()
        elif step.stage is RunStage.COMPILING_PDF and not self.quiet:
            stderr.print(f"Compiling {step.path} with Typst…")
        elif step.stage is RunStage.OUTPUT_WRITTEN:
            self.written.append(step.path)

    def _start(self) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,} rows"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=stderr,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=None, status="starting")

    def close(self) -> None:
        """Stop the live display, if it runs; again is a no-op."""
        if self._progress is not None:
            progress, self._progress = self._progress, None
            progress.stop()

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def entry_point() -> None:
    """The ``ashstream`` command: :func:`main`, then an exit that skips the interpreter's
    teardown. Everything of ours is closed by then (pools, files, DuckDB, Ray); what is
    left is freeing every module's objects one by one, a felt part of a small report's
    run. Output is flushed first; a closed pipe has nothing more to take."""
    code: int = 0
    if sys.stdout is None:
        sys.stdout = _ClosedOutput()
    if sys.stderr is None:  # nowhere to say anything: errors only set the exit code
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    try:
        main()
    except SystemExit as ended:  # click's standalone mode always ends with one
        if isinstance(ended.code, int):
            code = ended.code
        elif ended.code is not None:
            print(ended.code, file=sys.stderr)
            code = 1
    except OSError as exc:  # click's own output failed (--help to a full disk)
        code = 1
        with contextlib.suppress(OSError):
            os.write(2, f"Error: cannot write the output: {exc.strerror}\n".encode())
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader left early (| head): not a failure of the run
        except (OSError, ValueError) as exc:  # the output did not all get out
            if not code:
                code = 1
                with contextlib.suppress(OSError):
                    os.write(2, f"Error: the output could not be written: {exc}\n".encode())
    os._exit(code)


__all__ = ["entry_point", "main"]
