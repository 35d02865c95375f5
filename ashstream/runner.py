"""A whole run of a report, as ``ashstream run`` does it and a library caller can:
choose the engine, stream into the Typst module, compile the PDF, put both in place.

::

    from ashstream import run_report

    summary = run_report("report.yaml", output="out/data.typ", pdf="out/report.pdf")
    print(summary.rows, summary.seconds)

The outputs are written under temporary names beside their targets and renamed into
place only when both are complete (:mod:`ashstream.sinks`): an error or an interrupt
leaves neither. Errors are :class:`~ashstream.errors.AshstreamError` subclasses whose
``exit_code`` is the command's. ``run_report`` prints nothing; a ``progress`` callback
sees the run as it goes (the command draws its live display from it).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ashstream.cache import (
    CachedStream,
    CacheMerge,
    CacheStore,
    DamagedEntry,
    RunTexts,
    plan_run,
)
from ashstream.chunks import check_chunk_size
from ashstream.encode import encoder_name
from ashstream.engines.inline import InlineStream, inline_max_rows, runs_inline
from ashstream.errors import PipelineError, SettingsError
from ashstream.report import Report, parse_size, with_params
from ashstream.sinks import TypstModuleSink, compile_pdf

if TYPE_CHECKING:
    from ashstream.engines import Pool

ENGINES = ("local", "ray")

logger = logging.getLogger(__name__)


class RunStage(enum.Enum):
    """Where a run is, as :class:`RunProgress` reports it."""

    STARTED = "started"  # the engine is up and the stream open; no row yet
    CHUNK_WRITTEN = "chunk_written"  # a chunk went into the module
    STREAM_ENDED = "stream_ended"  # every row is in the module
    COMPILING_PDF = "compiling_pdf"  # Typst starts on the PDF
    OUTPUT_WRITTEN = "output_written"  # an output (``path``) is in place


@dataclass(frozen=True)
class RunProgress:
    """One step of a run, handed to ``run_report``'s ``progress`` callback in the
    caller's thread. The counts are those of the step (``rows`` so far)."""

    stage: RunStage
    rows: int = 0
    total_rows: int | None = None  # when the source says so cheaply
    elapsed_s: float = 0.0  # since the engine started
    engine: str = ""  # "inline", "local" or "ray"
    workers: int = 0  # transformers (local), cluster CPUs (ray), 0 (inline)
    memory_bytes: int | None = None  # local: the process tree's, at the last health check
    busy_workers: int | None = None  # local: transformers working on a batch now
    path: str | None = None  # OUTPUT_WRITTEN: the output put in place


@dataclass(frozen=True)
class RunSummary:
    """What a finished run did. :meth:`to_dict` is ``ashstream run --json``'s object."""

    report: str
    rows: int
    chunks: int
    engine: str  # "inline", "local" or "ray"
    workers: int  # transformers (local), cluster CPUs (ray), 0 (inline)
    peak_memory_bytes: int
    restarts: int | None  # local: children that died and were replaced; None on Ray
    skipped_rows: list[tuple[int, int]]  # row ranges left out (poison_policy: skip)
    warnings: list[str]
    groups: int  # groups closed, at every level
    totals: dict[str, Any]
    seconds: float  # from the engine's start to the module's end (the PDF not included)
    typst_path: str
    pdf_path: str | None
    read_on: str | None = None  # Ray: "cluster" or "driver"
    encoder: str = "native"  # this installation's, or "reference" (a Ray node runs its own)
    cache: dict[str, Any] | None = None  # reused_rows, computed_rows, mode; None: no cache

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain values, keys in the command's order."""
        summary = {
            "report": self.report,
            "rows": self.rows,
            "chunks": self.chunks,
            "engine": self.engine,
            "encoder": self.encoder,
            "workers": self.workers,
            "peak_memory_bytes": self.peak_memory_bytes,
            "restarts": self.restarts,
            "skipped_rows": self.skipped_rows,
            "warnings": self.warnings,
            "groups": self.groups,
            "totals": self.totals,
        }
        if self.engine == "ray":
            summary["read_on"] = self.read_on
        summary["seconds"] = self.seconds
        summary["rows_per_s"] = self.rows_per_s
        summary["outputs"] = {"typst": self.typst_path, "pdf": self.pdf_path}
        if self.cache is not None:
            summary["cache"] = self.cache
        return summary


def run_report(
    report: Report | str | os.PathLike,
    *,
    params: Mapping[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    pdf: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    engine: str | None = None,
    workers: int | None = None,
    inline_rows: int | None = None,
    ray_address: str | None = None,
    profile_dir: str | os.PathLike | None = None,
    progress: Callable[[RunProgress], None] | None = None,
    cache: str | os.PathLike | bool | None = None,
    cache_max_size: int | str | None = None,
) -> RunSummary:
    """Run ``report`` into its Typst module (and PDF); what ``ashstream run`` does.

    Runs in the caller's thread, which it blocks until the run ends. On the local
    engine, call it under ``if __name__ == "__main__":`` (see ``StreamPool``).

    Args:
        report: a :class:`Report`, or the path of its YAML file.
        params: values for the report's ``params``.
        output: the Typst module (default: the report's ``output.typst``, else
            ``NAME.typ``).
        pdf: also compile a PDF here (default: the report's ``output.pdf``, if any).
        chunk_size: rows per chunk (default: the report's, else 1000).
        engine: ``local`` (default) or ``ray``; ``ray_address`` implies ``ray``.
        workers: transformer processes (default: the report's, else one per core).
        inline_rows: run a Parquet source of at most this many rows in this process;
            0 never (default: a line for this machine's cores; 0 with ``workers``).
        ray_address: the Ray cluster (default ``RAY_ADDRESS``, else a local Ray).
        profile_dir: record the pool's processes with memray into this folder.
        progress: called at each :class:`RunStage` of the run.
        cache: reuse what an earlier run computed of the unchanged parts of the
            source, and keep what this run computes (see :mod:`ashstream.cache`):
            a folder, or True for the default one (``$XDG_CACHE_HOME/ashstream``);
            None: the report's ``pipeline.cache``; False: no cache.
        cache_max_size: bytes (or a size such as ``"20GiB"``) the cache may hold;
            least recently used texts (and their entries) go first (default: the
            report's, else no bound).

    Returns:
        What the run did; the outputs are in place.

    Raises:
        AshstreamError: whose ``exit_code`` is the command's; nothing is left behind.
    """
    engine = _engine_name(engine, ray_address, workers, inline_rows, profile_dir)
    encoder = encoder_name()  # a bad ASHSTREAM_ENCODER fails before anything is written
    report = with_params(report, params)
    store = _cache_store(report, cache, cache_max_size, engine)
    if inline_rows is None:  # asking for workers asks for a pool
        inline_rows = 0 if workers else inline_max_rows(len(os.sched_getaffinity(0)))
    workers = workers or report.pipeline.workers
    module_path = Path(output or report.output.typst or f"{report.name}.typ")
    pdf_path = pdf or report.output.pdf
    check_outputs(report, module_path, pdf_path)
    every_row = report.output.template is not None and report.output.template_rows == "all"
    preview = report.output.pdf_max_rows if pdf_path and not every_row else 0
    tell = progress or _ignore

    def attempt(check_cache_first: bool) -> RunSummary:
        sink = TypstModuleSink(module_path, report, preview_rows=preview)
        sink.open()
        started = time.perf_counter()
        try:
            engine_args = (engine, ray_address, workers, profile_dir, inline_rows)
            opened = _open_stream(report, chunk_size, store, engine_args, sink, check_cache_first)
            with opened as (handle, pool):
                name = "inline" if pool is None else pool.engine
                count = 0 if pool is None else pool.workers
                tell(RunProgress(RunStage.STARTED, engine=name, workers=count))
                chunks = groups = 0
                for chunk in handle:
                    sink.write(chunk)
                    chunks += 1
                    groups += len(chunk.groups)
                    if progress is not None:
                        elapsed_s = time.perf_counter() - started
                        progress(_progress_of(pool, sink.rows, handle.total_rows, elapsed_s))
                    del chunk  # written: held while the next is taken, it would be copied
                tell(RunProgress(RunStage.STREAM_ENDED, sink.rows, handle.total_rows))
                columns = handle.columns or ()
                results = handle.summary
                warnings = handle.lossy.messages()
                facts = {
                    "report": report.name,
                    "rows": sink.rows,
                    "chunks": chunks,
                    "engine": name,
                    "workers": count,
                    "peak_memory_bytes": (pool or handle).peak_memory_bytes,
                    "restarts": 0 if pool is None else pool.restarts,
                    "skipped_rows": handle.skipped,
                    "warnings": warnings,
                    "groups": groups + len(results.groups),
                    "totals": results.totals,
                    "read_on": handle.read_on if name == "ray" else None,
                    "encoder": encoder,
                    "cache": handle.cache_facts() if store is not None else None,
                }
                sink.finish(columns, results)  # before the stream's end: see _open_stream
            seconds = time.perf_counter() - started
            if pdf_path:
                tell(RunProgress(RunStage.COMPILING_PDF, sink.rows, path=str(pdf_path)))
                compile_pdf(pdf_path, sink, columns, report.output.template, every_row)
                tell(RunProgress(RunStage.OUTPUT_WRITTEN, sink.rows, path=str(pdf_path)))
                if report.output.template and not every_row and sink.rows > preview:
                    warnings.append(
                        f"the template read the first {preview:,} of {sink.rows:,} rows "
                        "(output.pdf_max_rows); output.template_rows: all gives it every row"
                    )
            sink.commit()  # last: a failure or Ctrl-C before this leaves no module behind
            tell(RunProgress(RunStage.OUTPUT_WRITTEN, sink.rows, path=str(module_path)))
        except BaseException:
            sink.abort()
            raise
        outputs = {"typst_path": str(module_path), "pdf_path": str(pdf_path) if pdf_path else None}
        return RunSummary(**facts, seconds=seconds, **outputs)

    try:
        return attempt(check_cache_first=False)
    except DamagedEntry as exc:  # found as its text was about to be copied (and logged)
        logger.info("%s; running again, checking the cache first", exc)
        return attempt(check_cache_first=True)


def _ignore(step: RunProgress) -> None:
    """The progress callback of a caller that passed none."""


def _progress_of(
    pool: Pool | None, rows: int, total_rows: int | None, elapsed_s: float
) -> RunProgress:
    """A written chunk's progress, with what the engine can say about itself."""
    if pool is None:
        return RunProgress(RunStage.CHUNK_WRITTEN, rows, total_rows, elapsed_s, "inline")
    local = pool.engine == "local"
    return RunProgress(
        RunStage.CHUNK_WRITTEN,
        rows,
        total_rows,
        elapsed_s,
        pool.engine,
        pool.workers,
        memory_bytes=pool.memory_bytes if local else None,
        busy_workers=pool.busy_transformers() if local else None,
    )


def _engine_name(
    engine: str | None,
    ray_address: str | None,
    workers: int | None,
    inline_rows: int | None,
    profile_dir: str | os.PathLike | None,
) -> str:
    """The engine the settings choose; settings that do not apply to it are refused."""
    if engine is not None and engine not in ENGINES:
        raise SettingsError(f"engine {engine!r} is none of {', '.join(ENGINES)}")
    if ray_address and engine == "local":
        raise SettingsError("a Ray address needs the Ray engine")
    if engine != "ray" and not ray_address:
        return "local"
    local_only = {"workers": workers, "inline_rows": inline_rows, "profile_dir": profile_dir}
    given = [name for name, value in local_only.items() if value is not None]
    if given:
        raise SettingsError(f"{', '.join(given)}: the local engine's, not Ray's")
    return "ray"


def _cache_store(
    report: Report,
    cache: str | os.PathLike | bool | None,
    max_size: int | str | None,
    engine: str,
) -> CacheStore | None:
    """The cache the settings ask for, opened (its folder made); None: no cache.

    Raises:
        SettingsError: the Ray engine, or a folder that cannot be used safely.
    """
    if cache is None:
        cache = report.pipeline.cache
    if cache is None or cache is False:
        return None
    if engine == "ray":
        raise SettingsError("the cache runs on the local engine; leave out --engine ray")
    if max_size is None:
        max_size = report.pipeline.cache_max_size
    elif not isinstance(max_size, int):
        max_size = parse_size(max_size, "--cache-max-size")
    folder = None if cache is True else cache
    return CacheStore(folder, max_size).open()


@contextmanager
def _open_stream(
    report: Report,
    chunk_size: int | None,
    store: CacheStore | None,
    engine_args: tuple,
    sink: TypstModuleSink,
    check_cache_first: bool = False,
) -> Iterator[tuple[Any, Pool | None]]:
    """The report's stream and its pool (see :func:`_open_engine`); with a cache, a
    stream of the cached units and, on an engine, the others (None without any), the
    texts of the latter kept in ``sink``'s module (see :class:`~ashstream.cache.RunTexts`).
    The caller finishes ``sink`` before the block ends: the cache's entries are then
    pointed at the module, unless it is an earlier file, linked."""
    if store is None:
        with _open_engine(report, chunk_size, *engine_args) as opened:
            yield opened
        return
    size = check_chunk_size(chunk_size or report.pipeline.chunk_size)
    plan = plan_run(report, store, check_cache_first)
    texts = merge = None
    try:
        continued = plan.continued_text(store, sink.module_head)
        # a killed run's module, its reused rows in place: written on, not copied
        if continued is not None and sink.continue_in(*continued[1:]):
            texts = RunTexts(store, sink.module_file, sink.text_start, continued=continued[0])
        else:
            try:
                texts = RunTexts(store, sink.module_file, sink.text_start)
            except OSError as exc:
                raise SettingsError(
                    f"cache folder {store.root}: cannot be used: {exc.strerror or exc}"
                ) from None
        merge = CacheMerge(report, size, plan, store, texts)
        if not merge.may_stay_in_place:
            sink.copy_as_fed()
        if plan.report is None:
            yield CachedStream(merge, None), None
        else:
            if not runs_inline(plan.report, engine_args[-1]):
                from ashstream.engines.local.children import start_fork_server

                start_fork_server()  # it starts while the reused units before are fed
            lead = merge.lead()
            with _open_engine(plan.report, size, *engine_args) as (handle, pool):
                handle.use_merge(merge)
                yield CachedStream(merge, handle, lead), pool
        merge.repoint(sink.linked)
    finally:
        if merge is not None:
            merge.close()
        plan.close()
        if texts is not None:
            texts.close()
    try:
        store.tidy(merge.finished)
    except OSError as exc:  # the run is done; the next one tidies
        logger.warning("cache folder %s: not tidied (%s)", store.root, exc)


@contextmanager
def _open_engine(
    report: Report,
    chunk_size: int | None,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    profile_dir: str | os.PathLike | None,
    inline_rows: int,
) -> Iterator[tuple[Any, Pool | None]]:
    """The report's stream and the pool running it, or None for a source small enough
    to run in this process (``inline_rows``): starting a pool costs more than a small
    report wins back."""
    if engine == "ray":
        try:
            from ashstream.engines.ray import RayPool
        except ImportError as exc:
            raise PipelineError(
                f"the Ray engine needs Ray ({exc}); install it with: pip install 'ashstream[ray]'"
            ) from None
        with RayPool(ray_address) as pool:
            yield pool.start(report, chunk_size), pool
        return
    if runs_inline(report, inline_rows):
        yield InlineStream(report, chunk_size), None
        return
    from ashstream.engines.local.pool import StreamPool  # loaded only when a pool is needed

    with StreamPool(workers, profile_dir=profile_dir) as pool:
        yield pool.start(report, chunk_size), pool


def check_outputs(report: Report, module_path: Path, pdf_path: str | os.PathLike | None) -> None:
    """Refuse outputs that would overwrite each other or an input, before anything runs
    (a run would replace the source it reads, or write the PDF and then fail).

    Raises:
        SettingsError: naming the output and what it would overwrite.
    """
    inputs = {report.path: "the report file", report.output.template: "the template"}
    inputs.update(dict.fromkeys(report.source.parquet, "a source file"))
    inputs[report.source.database] = "the source database"
    outputs = {"the Typst module": module_path, "the PDF": pdf_path}
    seen: dict[str, str] = {}
    for what, path in outputs.items():
        if path is None:
            continue
        entry = _entry(path)
        for other, description in inputs.items():
            if other and (entry == os.path.realpath(other) or _same_inode(path, other)):
                raise SettingsError(
                    f"{path}: {what} would overwrite {description}; give another output path"
                )
        if entry in seen:
            raise SettingsError(
                f"{path}: {what} would overwrite {seen[entry]}; give another output path"
            )
        seen[entry] = what


def _entry(path: str | os.PathLike) -> str:
    """The directory entry an output's rename replaces: its folder resolved, its own
    name not (a link there is replaced, not written through)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(folder), name)


def _same_inode(output: str | os.PathLike, other: str | os.PathLike) -> bool:
    """Whether an output that is a file (not a link) is ``other`` by another name."""
    try:
        mine, theirs = os.lstat(output), os.stat(other)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


__all__ = ["RunProgress", "RunStage", "RunSummary", "check_outputs", "run_report"]
