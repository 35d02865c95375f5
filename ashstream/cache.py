"""The incremental cache: a re-run pays for what changed, and a killed run's successor
for what was not done (``ashstream run --cache``, ``run_report(cache=...)``).

::

    plan_run ── units of the source, each looked up by its key ──► CachePlan
        │ cached units: text + partials from their entries
        │ the others: one stream over just them (Source.units), each batch marked
        ▼    with its unit and the running state after it
    CacheMerge (the engine's ordered merge) ── feeds both, in unit order, into one
        Collector and the module; commits each computed unit's entry as it completes

**Units.** Where rows come in the files' order (a Parquet source with no ORDER BY:
no groups or order_by, or ``source.sorted: true``), each file is a unit, and a file of
more than :data:`UNIT_ROWS` rows is cut at row groups into units of about that many.
Elsewhere (the report sorts across files, or a DuckDB database) the whole result is
one unit.

**Keys.** A unit's key hashes the report's :func:`fingerprint` (everything that shapes
a unit's text and partials, and nothing that does not, such as workers or chunk size)
with the unit's identity: a file's real path, size, mtime and a hash of its footer,
with its row range; a database's path, size and mtime with its WAL's; and, for a
report whose raw-series charts record row numbers, the unit's first row. A running
value continues across units, so an entry also records the running state it started
from (only the part that reached its first group) and is used only with the same.

**Entries** are one small file each: a header with checksums and where the unit's
text lies (a byte range of a file in ``texts/``, copied into the module with
``os.copy_file_range``), then its metadata in :mod:`ashstream.cache_codec` (never
pickle), with the unit's batches' partials joined into a few segments (one per 64
batches, :data:`SEGMENT_BATCHES`), as the collector took them. The texts are modules:
each run's is hard-linked into the cache (:class:`RunTexts`), so text is written once.
Written to a temporary file and renamed. Headers and metadata are checked as the run
plans, texts in the background before each is copied (a text found bad then starts the
run once more: :class:`DamagedEntry`); a bad entry is logged once, removed and
recomputed; past ``max_size_bytes`` the least recently used texts go first, with their
entries (:meth:`CacheStore.tidy`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ashstream import __version__
from ashstream.analysis.aggregate import (
    Analysis,
    BatchPartial,
    ClosedGroup,
    join_partials,
    same_keys,
)
from ashstream.batch_job import EncodedBatch
from ashstream.cache_codec import CodecError, dumps, loads
from ashstream.checksum import crc32, crc32_combine
from ashstream.chunks import Chunk, FileChunk, OrderedMerge
from ashstream.errors import PipelineError, SettingsError
from ashstream.procs import pid_alive
from ashstream.report import Report
from ashstream.sinks import link_open_file
from ashstream.sources import has_order_by, parquet_footer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 6  # of the entries and of the codec: another is recomputed
MAGIC = b"ASHCACHE"
# magic, version, text file, text offset, text bytes, text crc, meta bytes, meta crc,
# key, report (its fingerprint's first 16 bytes: see CacheStore.tidy), header crc
_HEADER = struct.Struct("<8sI16sQQIQI32s16sI")
HEADER_BYTES = _HEADER.size
# A file of more rows is cut into units of about this many (at row groups): a killed
# run of one big file resumes from its last unit, and a unit's partials stay small.
# Smaller units cost a DuckDB query each (~1 ms) and an entry each.
UNIT_ROWS = 1_000_000
CHECK_THREADS = 2  # crc32 releases the GIL: entries' texts are checked in parallel
CHECK_BYTES = 2**18  # read through one buffer that stays in the L2 cache for the checksum
# batches of a computed unit the collector takes at once at most (CacheMerge._hand_over):
# its checks of memory and order run that often
SEGMENT_BATCHES = 64


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ashstream``, else ``~/.cache/ashstream``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "ashstream"


# ------------------------------------------------------------------------- keys


def fingerprint(report: Report) -> bytes:
    """What shapes a unit's text and partials: the source's SQL pieces (not its files,
    which are the units'), the parameters, groups, variables, charts, the display time
    zone and ashstream's version. Not the outputs, workers, chunk size or memory, which
    change neither (the module's own ``meta`` is written fresh each run)."""
    src = report.source
    shaping = (
        FORMAT_VERSION,
        __version__,
        src.kind,
        src.query,
        src.where,
        src.order_by,
        src.sorted,
        tuple(sorted(report.param_values.items())),
        report.fields,
        report.groups,
        report.variables,
        report.charts,
        report.pipeline.timezone,
    )
    return hashlib.sha256(repr(shaping).encode()).digest()


def report_id(report: Report, base: bytes) -> bytes:
    """What an entry records of its report: its :func:`fingerprint` ``base`` with
    where the report and its source are (two reports alike but for their files are
    two; the same report over a grown or shrunk folder is one), by which its units'
    other entries are found (:meth:`CacheStore.tidy`)."""
    src = report.source
    folders = {os.path.dirname(os.path.abspath(f)) for f in src.parquet}
    files_in = os.path.commonpath(folders) if folders else None
    where = (report.name, report.path, report.base_dir, src.database, files_in)
    return hashlib.sha256(base + repr(where).encode()).digest()[:16]


def _footer_hash(path: str) -> bytes:
    """A hash of a Parquet file's footer (its metadata and its length)."""
    with open(path, "rb") as file:
        file.seek(-8, os.SEEK_END)
        tail = file.read(8)
        length = int.from_bytes(tail[:4], "little")
        file.seek(-8 - length, os.SEEK_END)
        return hashlib.sha256(file.read(length) + tail).digest()


def _file_identity(path: str) -> tuple:
    info = os.stat(path)
    return (os.path.realpath(path), info.st_size, info.st_mtime_ns, info.st_ino)


@dataclass(frozen=True)
class Unit:
    """A part of the source read as one: a Parquet file's row range, or the whole."""

    identity: tuple  # what the key hashes besides the fingerprint
    path: str | None = None  # the Parquet file; None: the whole source
    row_range: tuple[int, int] | None = None  # of ``path``; None: all of it
    rows: int | None = None  # from the footer


def parquet_units(report: Report) -> list[Unit]:
    """The Parquet source's files, cut into units (see the module's docstring)."""
    units = []
    for path in report.source.parquet:
        identity = (*_file_identity(path), _footer_hash(path))
        metadata = parquet_footer(path)
        if metadata.num_rows <= UNIT_ROWS:
            units.append(Unit(identity, path, None, metadata.num_rows))
            continue
        first = rows = 0
        for i in range(metadata.num_row_groups):
            rows += metadata.row_group(i).num_rows
            if rows - first >= UNIT_ROWS or i == metadata.num_row_groups - 1:
                units.append(Unit((*identity, first, rows), path, (first, rows), rows - first))
                first = rows
    return units


def whole_unit(report: Report) -> Unit:
    """The whole result as one unit: keyed by every file it reads."""
    src = report.source
    if src.parquet:
        files = tuple((*_file_identity(p), _footer_hash(p)) for p in src.parquet)
        return Unit(("parquet", files))
    identity: tuple = ("duckdb",)
    if src.database:
        identity += (_file_identity(src.database),)
        wal = src.database + ".wal"
        identity += (_file_identity(wal),) if os.path.exists(wal) else (None,)
    return Unit(identity)


def by_units(report: Report) -> bool:
    """Whether the rows come in the files' order, so that units can be reused alone."""
    return bool(report.source.parquet) and not has_order_by(report)


def position_dependent(report: Report) -> bool:
    """Whether a unit's text or partials depend on the rows before it: running values
    carry a state into it, and a raw series records row numbers."""
    return any(v.running for v in report.variables) or any(c.agg == "none" for c in report.charts)


# ----------------------------------------------------------------------- entries


@dataclass
class Entry:
    """A unit's entry whose header and metadata are checked; its text, ``text_bytes``
    at ``text_offset`` of an open text file, is checked by :meth:`check`, in the
    background while the run goes on (see :meth:`CachePlan.start_checks`)."""

    key: bytes
    path: Path
    identity: tuple[int, int]  # of the entry's file, to remove that file only
    text: BinaryIO  # the text file, open (shared by the entries that point into it)
    text_name: str
    text_offset: int
    text_bytes: int
    text_crc: int
    raw_meta: bytes  # as stored: an entry pointed at another text keeps it
    meta: dict  # rows, chunks, segments, lossy, columns, first_keys, carry_used, carry_out
    checked: Future | None = None  # of check(), once scheduled

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def check(self, stop: threading.Event | None = None) -> None:
        """Read the text through one buffer and compare its checksum; give up as soon
        as ``stop`` is set (the run ended).

        Raises:
            CorruptEntry: the text is not the one written.
        """
        buffer = memoryview(bytearray(CHECK_BYTES))
        offset, end, crc = self.text_offset, self.text_offset + self.text_bytes, 0
        while offset < end:
            if stop is not None and stop.is_set():
                return
            read = os.preadv(self.text.fileno(), [buffer[: min(CHECK_BYTES, end - offset)]], offset)
            if not read:
                raise CorruptEntry("its text is truncated")
            crc = crc32(buffer[:read], crc)
            offset += read
        if crc != self.text_crc:
            raise CorruptEntry("text checksum mismatch")


def _segments_shape(segments: object) -> bool:
    """Whether an entry's ``segments`` are (state bytes, batches) pairs."""
    return isinstance(segments, list) and all(
        isinstance(pair, tuple)
        and len(pair) == 2
        and isinstance(pair[0], bytes)
        and isinstance(pair[1], int)
        for pair in segments
    )


class CorruptEntry(Exception):
    """An entry file that is not a whole entry of this version (say why); ``identity``
    is the file's (device, inode), to remove that file only."""

    identity: tuple[int, int] | None = None


class GoneText(CorruptEntry):
    """An entry whose text file was removed (evicted, or by hand): dropped quietly."""


def _open_private(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor of a file in the cache folder, never through a link."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _read_header(head: bytes) -> tuple:
    """The fields of an entry's header (see ``_HEADER``), checked.

    Raises:
        CorruptEntry: truncated, foreign, flipped or of another version.
    """
    if len(head) < HEADER_BYTES:
        raise CorruptEntry("truncated header")
    fields = _HEADER.unpack(head)
    if fields[0] != MAGIC:
        raise CorruptEntry("not an ashstream cache entry")
    if crc32(head[:-4]) != fields[-1]:
        raise CorruptEntry("header checksum mismatch")
    if fields[1] != FORMAT_VERSION:
        raise CorruptEntry(f"format version {fields[1]}, not {FORMAT_VERSION}")
    return fields


def _read_entry(key: bytes, path: Path, texts: OpenTexts) -> Entry | None:
    """The entry at ``path``, its header and metadata checked and its text file open
    (its text is checked later: :meth:`Entry.check`); None when there is none.

    Raises:
        CorruptEntry: truncated, flipped, foreign or of another version; GoneText:
            its text file is gone.
    """
    try:
        fd = _open_private(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        try:
            _, _, name, offset, text_bytes, text_crc, meta_bytes, meta_crc, stored_key, _, _ = (
                _read_header(file.read(HEADER_BYTES))
            )
            if stored_key != key:
                raise CorruptEntry("the entry of another key")
            if os.fstat(fd).st_size != HEADER_BYTES + meta_bytes:
                raise CorruptEntry("truncated or extended")
            raw = file.read(meta_bytes)
            if crc32(raw) != meta_crc:
                raise CorruptEntry("metadata checksum mismatch")
            try:
                meta = loads(raw)
            except CodecError as exc:
                raise CorruptEntry(f"metadata unreadable: {exc}") from None
            if (
                not isinstance(meta, dict)
                or not isinstance(meta.get("rows"), int)
                or not _segments_shape(meta.get("segments"))
            ):
                raise CorruptEntry("metadata of another shape")
            text = texts.get(name.hex())
            if text is None:
                raise GoneText("its text file is gone")
            if text_bytes and os.fstat(text.fileno()).st_size < offset + text_bytes:
                raise CorruptEntry("its text is truncated")
        except CorruptEntry as exc:
            exc.identity = identity
            raise
        with contextlib.suppress(OSError):
            os.utime(fd)  # its mtime is its last use, for eviction
    return Entry(key, path, identity, text, name.hex(), offset, text_bytes, text_crc, raw, meta)


class DamagedEntry(PipelineError):
    """An entry's text failed its check after the run had planned to reuse it: the run
    starts again, checking every entry first (see :func:`run_report`)."""


class OpenTexts:
    """The text files a plan's entries point into, each opened once and held under a
    shared lock while the run reads it (a text file no entry points to any more is
    removed by :meth:`CacheStore.tidy` only when no run holds it). One a run continues
    holds an exclusive lock (:meth:`CachePlan.continued_text`): it is read unlocked,
    as the ranges entries point to never change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, BinaryIO] = {}
        self.lock = threading.Lock()  # entries are looked up by threads

    def get(self, name: str) -> BinaryIO | None:
        """The text file ``name``, open; None if it is gone."""
        with self.lock:
            if name not in self.files:
                try:
                    fd = _open_private(self.folder / name)
                except FileNotFoundError:
                    return None
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                self.files[name] = os.fdopen(fd, "rb")
            return self.files[name]

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()


class RunTexts:
    """Where a run keeps the texts of the units it computes, ``texts/<name>``: the
    module itself, hard-linked into the cache as soon as it is created (so a unit's
    text is written once, and a killed run's units stay reusable), or, where it
    cannot be linked (the cache on another file system), a file of the cache's own
    that the run appends each text to. Held under a shared lock while the run goes on.

    Args:
        module: the module being written, or None; start: where its rows' text begins;
        continued: the name of the text the module is (a killed run's it continues,
            :meth:`CachePlan.continued_text`, which holds it), not to link again.
    """

    def __init__(
        self,
        store: CacheStore,
        module: BinaryIO | None,
        start: int = 0,
        continued: str | None = None,
    ) -> None:
        self.name = continued or os.urandom(16).hex()
        self.continued = continued is not None
        path = store.texts_dir / self.name
        self.module: BinaryIO | None = module if continued else None
        self.own: BinaryIO | None = None
        self.start = start
        self.written = 0  # to ``own``
        self.held: int | None = None
        if continued:
            return
        with store.locked():  # no tidy between its making and its lock
            if module is not None:
                with contextlib.suppress(OSError):  # the module's file, not its name
                    link_open_file(module.fileno(), path)
                    self.module = module
            if self.module is None:
                fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                self.own = os.fdopen(fd, "wb")
            self.held = _open_private(path)
            fcntl.flock(self.held, fcntl.LOCK_SH)

    @property
    def linked(self) -> bool:
        return self.module is not None

    def place(self, merged_bytes: int) -> int:
        """Where the text of a unit that starts now goes, ``merged_bytes`` of the
        module's text having come before it."""
        return self.start + merged_bytes if self.linked else self.written

    def add(self, text: Any) -> None:
        """A computed unit's text (the module's own writes keep it when linked)."""
        if self.own is not None:
            self.own.write(text)
            self.written += len(text)

    def sync(self) -> None:
        """Make the texts added so far readable by another process, before an entry
        that points to them is committed (a finished module is closed: written)."""
        file = self.module or self.own
        if not file.closed:
            file.flush()

    def close(self) -> None:
        if self.own is not None:
            self.own.close()
        if self.held is not None:
            os.close(self.held)


class FinishedRun(NamedTuple):
    """A run that read its report's units whole, as :meth:`CacheStore.tidy` takes it."""

    report: bytes  # its report_id
    keys: set[bytes]  # its units' keys: their entries are the report's that stay
    began: float  # when it looked them up: an entry written or reused since is another run's


class Listed(NamedTuple):
    """An entry as :meth:`CacheStore.listing` finds it."""

    name: str
    bytes: int
    last_use: float  # its mtime, as a timestamp
    text: str | None  # its text file's name; None: its header cannot be read
    report: bytes | None  # its report's report_id; None: its header cannot be read


class CacheStore:
    """A cache folder: ``entries/`` (one small file a key: its unit's metadata and
    where its text lies), ``texts/`` (the texts, one file a run: its module,
    hard-linked, or the cache's own copy), ``tmp/`` (entries being written) and a
    ``lock`` file held while texts are made, tidied or cleared. Entries and texts
    never change once in place, so two runs sharing the folder need no lock to read or
    write them: both may write one key, and the second rename replaces the first.

    Args:
        root: the folder, created 0700 (it holds report data); one of another user, or
            that others may write, is refused.
        max_size_bytes: the least recently used texts, and their entries, are removed
            past it (at the end of a run); None: no bound.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_size_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.max_size_bytes = max_size_bytes
        self.entries_dir = self.root / "entries"
        self.texts_dir = self.root / "texts"
        self.tmp_dir = self.root / "tmp"
        self._warned: set[bytes] = set()

    def open(self) -> CacheStore:
        """Create or check the folder; remove what killed runs left in ``tmp/``.

        Raises:
            SettingsError: the folder cannot be made or is not safely ours.
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.root)
            if not stat.S_ISDIR(info.st_mode):
                raise SettingsError(f"cache folder {self.root}: not a folder")
            if info.st_uid != os.geteuid():
                raise SettingsError(f"cache folder {self.root}: belongs to another user")
            if info.st_mode & 0o022:
                raise SettingsError(
                    f"cache folder {self.root}: others may write to it; chmod 700 it"
                )
            for folder in (self.entries_dir, self.texts_dir, self.tmp_dir):
                folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SettingsError(
                f"cache folder {self.root}: cannot be used: {exc.strerror or exc}"
            ) from None
        self._sweep_temps()
        return self

    def _sweep_temps(self) -> None:
        for entry in os.scandir(self.tmp_dir):
            pid = entry.name.split(".", 1)[0]
            if pid.isdigit() and int(pid) < 2**31 and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def entry_path(self, key: bytes) -> Path:
        return self.entries_dir / key.hex()

    def lookup(self, key: bytes, texts: OpenTexts) -> Entry | None:
        """The key's entry, its header and metadata checked (see :func:`_read_entry`);
        a bad one is logged once, removed, and reported as missing, as is one that
        cannot be read (left in place: it may be good)."""
        path = self.entry_path(key)
        try:
            return _read_entry(key, path, texts)
        except CorruptEntry as exc:
            self.discard(key, path, exc, exc.identity, quiet=isinstance(exc, GoneText))
        except OSError as exc:
            logger.warning("cache entry %s cannot be read (%s); recomputing it", path, exc)
        return None

    def discard(
        self, key: bytes, path: Path, why: Exception, identity: tuple | None, quiet: bool = False
    ) -> None:
        """Log a bad entry once and remove it, if ``path`` is still the file of that
        ``identity`` (another run may have put a good one there since)."""
        if key not in self._warned and not quiet:
            self._warned.add(key)
            logger.warning("cache entry %s is unusable (%s); recomputing it", path, why)
        with contextlib.suppress(OSError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == identity:
                path.unlink()

    def discard_entry(self, entry: Entry, why: Exception) -> None:
        """:meth:`discard` of an entry whose text failed its check."""
        self.discard(entry.key, entry.path, why, entry.identity)

    def put(
        self,
        key: bytes,
        report: bytes,
        text_name: str,
        offset: int,
        length: int,
        crc: int,
        raw: bytes,
    ) -> None:
        """Put the key's entry in place: of the report whose :func:`report_id` is
        ``report``, its metadata ``raw``, its text ``length`` bytes at ``offset`` of
        ``texts/<text_name>``."""
        head = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            bytes.fromhex(text_name),
            offset,
            length,
            crc,
            len(raw),
            crc32(raw),
            key,
            report,
            0,
        )[:-4]
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=f"{os.getpid()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(head + struct.pack("<I", crc32(head)) + raw)
            os.replace(name, self.entry_path(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

    def listing(self) -> tuple[list[Listed], dict[str, int]]:
        """Every entry, oldest use first; and every text file's bytes."""
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for item in os.scandir(self.entries_dir):
                with contextlib.suppress(OSError):
                    info = item.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    with open(item.path, "rb") as file:
                        try:
                            fields = _read_header(file.read(HEADER_BYTES))
                            text, report = fields[2].hex(), fields[9]
                        except CorruptEntry:
                            text = report = None
                    entries.append(Listed(item.name, info.st_size, info.st_mtime, text, report))
        texts = {}
        with contextlib.suppress(FileNotFoundError):
            for item in os.scandir(self.texts_dir):
                with contextlib.suppress(OSError):
                    info = item.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        texts[item.name] = info.st_size
        return sorted(entries, key=lambda e: e.last_use), texts

    def size_bytes(self) -> int:
        entries, texts = self.listing()
        return sum(e.bytes for e in entries) + sum(texts.values())

    def tidy(self, run: FinishedRun | None = None) -> int:
        """Remove what no run will use, and then what is past ``max_size_bytes``; the
        bytes removed. Under the folder's lock, so two runs ending at once do not both
        remove for the same excess.

        No run will use: an entry that cannot be read (damaged, or of another format
        version, whose texts this version does not keep); an entry whose text file is
        gone; an entry of the report that ``run`` has just read whole, but not of its
        units' keys, and not used since it began: the unit of a file since rewritten,
        deleted or moved, or started from another running state (it would keep a whole
        earlier module alive); a text file no entry points to that no run holds. Past
        the bound, the least recently used texts go, with their entries, but not one
        that a run holds (reads, or writes its module in): the next one goes instead."""
        removed = 0
        report, keys, began = run if run is not None else (None, set(), 0.0)
        used = {key.hex() for key in keys}
        with self.locked():
            entries, texts = self.listing()
            users: dict[str, list[Listed]] = {}
            for entry in entries:
                if (
                    entry.text is None
                    or entry.text not in texts
                    or (
                        entry.report == report and entry.name not in used and entry.last_use < began
                    )
                ):
                    removed += self._remove(self.entries_dir / entry.name, entry.bytes)
                else:
                    users.setdefault(entry.text, []).append(entry)
            for name in [n for n in texts if n not in users]:
                freed = self._remove_unheld(name, texts[name])
                if freed is not None:
                    removed += freed
                    del texts[name]
            if self.max_size_bytes is None:
                return removed
            total = sum(texts.values()) + sum(e.bytes for group in users.values() for e in group)
            # last use: its newest entry's; a text no entry points to yet is a run's
            # that goes on, the newest of all
            for name, size in sorted(
                texts.items(),
                key=lambda t: max((e.last_use for e in users.get(t[0], ())), default=float("inf")),
            ):
                if total <= self.max_size_bytes:
                    break
                freed = self._remove_unheld(name, size)
                if freed is None:
                    continue  # a run reads or writes it now: in use, it stays
                group = users.get(name, [])
                for entry in group:
                    removed += self._remove(self.entries_dir / entry.name, entry.bytes)
                removed += freed
                total -= size + sum(e.bytes for e in group)
        return removed

    def _remove_unheld(self, name: str, size: int) -> int | None:
        """Remove a text file of ``size`` bytes unless a run holds it (its lock): the
        bytes removed (0: gone already), None when it is held."""
        path = self.texts_dir / name
        try:
            fd = _open_private(path)
        except FileNotFoundError:
            return 0
        except OSError:  # no permission: no run can read it either
            return self._remove(path, size)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (or no lock to be had here: taken as held)
            return None
        try:
            return self._remove(path, size)
        finally:
            os.close(fd)

    @staticmethod
    def _remove(path: Path, size: int) -> int:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            return size
        return 0

    def clear(self) -> tuple[int, int]:
        """Remove every entry and text; (entries, bytes) removed."""
        with self.locked():
            entries, texts = self.listing()
            size = sum(self._remove(self.entries_dir / e.name, e.bytes) for e in entries)
            size += sum(self._remove(self.texts_dir / n, s) for n, s in texts.items())
        return len(entries), size

    def folder_time(self) -> float:
        """The time as the folder's file system dates a file it touches (its clock: an
        NFS server's; its grain: a kernel tick, 1-10 ms, or finer), read just past a
        change of it, so that an entry written before is dated earlier and one
        touched after as late or later. Waits 20 ms at most: on a file system that
        dates in whole seconds, an entry of the same second ties, and is kept.
        -inf when the folder cannot be dated (nothing then counts as unused since)."""
        try:
            fd = _open_private(self.root / "lock", os.O_RDWR | os.O_CREAT)
        except OSError:
            return float("-inf")
        try:
            os.utime(fd)
            first = os.fstat(fd).st_mtime
            deadline = time.monotonic() + 0.02
            while time.monotonic() < deadline:
                time.sleep(0.001)
                os.utime(fd)
                touched = os.fstat(fd).st_mtime
                if touched != first:
                    return touched
            return first
        except OSError:
            return float("-inf")
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = _open_private(self.root / "lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -------------------------------------------------------------------------- plan


@dataclass
class PlannedUnit:
    unit: Unit
    key: bytes
    entry: Entry | None = None  # None: to compute
    stream_index: int | None = None  # its place among the computed units


@dataclass
class CachePlan:
    """Which units are reused and which computed; ``report`` reads only the latter."""

    mode: str  # "units" or "whole"
    units: list[PlannedUnit]
    carry_in: dict  # the running state before the first computed unit
    report: Report | None  # the source restricted to the computed units; None: none
    texts: OpenTexts  # the text files the reused entries point into
    began: float  # when the units were looked up (CacheStore.folder_time(); see FinishedRun)
    checks: ThreadPoolExecutor | None = None  # checking the reused entries' texts
    stop_checks: threading.Event = field(default_factory=threading.Event)

    @property
    def reused_rows(self) -> int:
        return sum(p.entry.rows for p in self.units if p.entry is not None)

    def start_checks(self) -> None:
        """Check the reused entries' texts in the background, in the order they are
        copied: the copy of one overlaps the check of the next ones."""
        reused = [p.entry for p in self.units if p.entry is not None]
        if reused:
            self.checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="ashstream-check")
            for entry in reused:
                entry.checked = self.checks.submit(entry.check, self.stop_checks)

    def continued_text(self, store: CacheStore, head: bytes) -> tuple[str, BinaryIO, int] | None:
        """The text a run can continue rather than copy, and where its reused rows end:
        a killed run's module, whose rows so far are all the reused units, in order,
        from where the module's start ``head`` ends, that starts with ``head``, that
        has no name but the cache's (no one's output), that no other run reads (an
        exclusive lock, held until :meth:`close`) and that no other entry points into
        (what it points to would change). None if there is none."""
        first = next((i for i, p in enumerate(self.units) if p.entry is None), None)
        if first is None or any(p.entry is not None for p in self.units[first:]):
            return None
        found, end = None, len(head)
        for p in self.units[:first]:
            if p.entry.text_bytes:
                found = found or p.entry
                if p.entry.text is not found.text or p.entry.text_offset != end:
                    return None
                end += p.entry.text_bytes
        if found is None:
            return None
        fd = found.text.fileno()
        try:
            if os.fstat(fd).st_nlink != 1 or os.pread(fd, len(head), 0) != head:
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            reused = {p.key.hex() for p in self.units[:first]}
            entries, _ = store.listing()
        except OSError:
            return None
        if any(e.text == found.text_name and e.name not in reused for e in entries):
            fcntl.flock(fd, fcntl.LOCK_SH)
            return None
        return found.text_name, found.text, end

    def close(self) -> None:
        if self.checks is not None:  # before the files close: a check may be reading one
            self.stop_checks.set()
            self.checks.shutdown(wait=True, cancel_futures=True)
        self.texts.close()


def _running_levels(analysis: Analysis | None) -> dict[str, int]:
    if analysis is None:
        return {}
    return {v.name: analysis.level(v) for v in analysis.variables if v.running}


def effective_carry(carry: dict, first_keys: tuple | None, levels: dict[str, int]) -> bytes:
    """The part of a running state a unit whose first row has key path ``first_keys``
    uses: a variable's state only where its group continues into the unit (as
    :class:`~ashstream.analysis.aggregate.RunningColumns` does), as bytes to compare."""
    if first_keys is None:
        return b""
    used = {}
    for name, level in sorted(levels.items()):
        held = carry.get(name)
        if held is not None and same_keys(held[0], tuple(first_keys[:level])):
            used[name] = held[1]
    return dumps(used)


def _unit_key(base: bytes, unit: Unit, first_row: int | None) -> bytes:
    identity = unit.identity if first_row is None else (*unit.identity, first_row)
    return hashlib.sha256(base + repr(identity).encode()).digest()


def plan_run(report: Report, store: CacheStore, check_first: bool = False) -> CachePlan:
    """Look the source's units up; the computed ones make one stream (see the module
    docstring). The reused entries' texts are checked in the background
    (:meth:`CachePlan.start_checks`), or, with ``check_first``, before they count as
    found (after a :class:`DamagedEntry`: one more start at most).

    A report whose units depend on the rows before them reuses the unbroken run of
    units from the start: after the first unit computed, the rows and running state
    the next ones start from are not known before they are read.

    Raises:
        SourceError: a Parquet file cannot be read, or the files' schemas differ.
    """
    from ashstream.errors import SourceError
    from ashstream.sources import check_parquet_files

    began = store.folder_time()
    mode = "units" if by_units(report) else "whole"
    try:
        if report.source.parquet:
            check_parquet_files(report)
        units = parquet_units(report) if mode == "units" else [whole_unit(report)]
    except OSError as exc:
        raise SourceError(f"{report.path}: source: {exc}") from None
    base = fingerprint(report)
    row_numbers = any(c.agg == "none" for c in report.charts)
    levels = _running_levels(Analysis.of(report))
    texts = OpenTexts(store.texts_dir)
    planned: list[PlannedUnit] = []
    carry: dict = {}
    if not position_dependent(report):
        planned = [PlannedUnit(u, _unit_key(base, u, None)) for u in units]
        _lookup_parallel(store, texts, planned, check_first)
    else:  # one by one: each key (row numbers) and running state follows the one before
        first_row, broken, carry_in = 0, False, {}
        for unit in units:
            if broken:  # its key is known once the rows before it are (CacheMerge._start)
                planned.append(
                    PlannedUnit(unit, b"" if row_numbers else _unit_key(base, unit, None))
                )
                continue
            planned.append(
                PlannedUnit(unit, _unit_key(base, unit, first_row if row_numbers else None))
            )
            entry = _found(store, texts, planned[-1].key, check_first)
            meta = entry.meta if entry is not None else {}
            if entry is not None and effective_carry(
                carry, meta.get("first_keys"), levels
            ) != meta.get("carry_used"):
                entry = None
            if entry is None:
                broken, carry_in = True, carry
                continue
            planned[-1].entry = entry
            first_row += entry.rows
            if meta.get("first_keys") is not None:
                carry = meta["carry_out"]
        carry = carry_in if broken else carry
    computed = [p for p in planned if p.entry is None]
    for index, p in enumerate(computed):
        p.stream_index = index
    compute_report = None
    if computed:
        first_row = sum(p.entry.rows for p in planned[: planned.index(computed[0])])
        compute_report = _restricted(report, mode, [p.unit for p in computed], carry, first_row)
    plan = CachePlan(mode, planned, carry, compute_report, texts, began)
    if not check_first:
        plan.start_checks()
    return plan


def _found(store: CacheStore, texts: OpenTexts, key: bytes, check_now: bool) -> Entry | None:
    """The key's entry, its text checked too with ``check_now``; None if none or bad."""
    entry = store.lookup(key, texts)
    if entry is not None and check_now:
        try:
            entry.check()
        except (CorruptEntry, OSError) as exc:
            store.discard_entry(entry, exc)
            return None
    return entry


def _lookup_parallel(
    store: CacheStore, texts: OpenTexts, planned: list[PlannedUnit], check_now: bool
) -> None:
    """Look every unit up at once (each a few reads; with ``check_now``, all its text)."""
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="ashstream-cache") as pool:
        found = pool.map(lambda p: _found(store, texts, p.key, check_now), planned)
        for p, entry in zip(planned, found, strict=True):
            p.entry = entry


def _restricted(
    report: Report, mode: str, units: list[Unit], carry_in: dict, first_row: int
) -> Report:
    """The report reading only ``units`` (in units mode), from running state
    ``carry_in``, its rows numbered from ``first_row`` (a raw series records them)."""
    src = report.source
    if mode == "whole":
        return report
    parts = tuple((u.path, u.row_range) for u in units)
    files = tuple(dict.fromkeys(u.path for u in units))
    source = dataclasses.replace(
        src,
        parquet=files,
        units=parts,
        running_carry=tuple(carry_in.items()),
        first_row=first_row,
        count_rows=False,
    )
    return dataclasses.replace(report, source=source)


# ------------------------------------------------------------------------- merge


@dataclass
class _Computing:
    """A unit of the stream being taken: its entry gathered as its batches come."""

    planned: PlannedUnit
    cacheable: bool  # False: a state the codec refuses, or its text could not be kept
    carry_in: dict
    offset: int  # of its text, in the run's text file
    text_bytes: int = 0
    text_crc: int = 0
    rows: int = 0
    chunks: int = 0
    partial: BatchPartial | None = None  # its batches' partials since the last segment
    batches: int = 0  # in partial
    segments: list[tuple[bytes, int]] = field(default_factory=list)  # taken: state, batches
    segment_row: int = 0  # where partial's rows start
    lossy: list = field(default_factory=list)
    first_keys: tuple | None = None
    carry_out: dict | None = None


class CacheMerge(OrderedMerge):
    """The engine's ordered merge for a cached run: before each unit of the stream it
    feeds the cached units that come first, and it writes each computed unit's entry
    as its batches are taken, committed when the next unit starts (so a killed run's
    successor finds every unit that was complete). The stream's end is not the run's:
    :meth:`rest` feeds the cached units after it.

    A computed unit's batches' partials are joined as they come, and the collector
    takes them in segments (at most :data:`SEGMENT_BATCHES` batches, the rest of the
    unit, the last at the stream's end), stored as taken: a re-run feeds the collector
    the same segments, and each state is merged once (the groups a segment closed go
    with the next chunk, in order).

    When the run's texts are its module (linked), the reused entries are pointed at
    their copies in it once it is finished (:meth:`repoint`), so the texts of earlier runs are no longer
    needed (:meth:`CacheStore.tidy` removes them) and the cache holds one copy of each
    unit's text. Unless the module is the earlier text itself: a run that reuses all
    of one text file, in place, from its start, and finds it is the module byte for
    byte (the sink then links that file as the module,
    :class:`~ashstream.sinks.TypstModuleSink`), leaves the entries as they are."""

    def __init__(
        self,
        report: Report,
        chunk_size: int,
        plan: CachePlan,
        store: CacheStore,
        texts: RunTexts,
    ) -> None:
        super().__init__(Analysis.of(report), chunk_size)
        self.report = report
        self.plan = plan
        self.store = store
        self.texts = texts
        self.fed: list[tuple[Entry, int]] = []  # reused entries and their texts' new places
        self.levels = _running_levels(self.collector.analysis if self.collector else None)
        self.base = fingerprint(report)
        self.report_id = report_id(report, self.base)
        self.row_numbers = any(c.agg == "none" for c in report.charts)
        self.next_unit = 0  # in plan.units: the first not yet fed or committed
        self.carry = dict(plan.carry_in) if plan.report is not None else {}
        self.current: _Computing | None = None
        self.closed: list[ClosedGroup] = []  # by segments the collector took, for the next chunk
        self.columns: tuple[str, ...] | None = None  # from the cached entries
        self.stream_columns: Callable[[], tuple[str, ...] | None] = lambda: None  # the engine's
        self.computed_rows = 0
        # once every unit is fed or committed: for CacheStore.tidy
        self.finished: FinishedRun | None = None
        # commits the computed units' entries, in order, off the thread that takes the
        # chunks (the run's busiest)
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="ashstream-cache-put")

    @property
    def may_stay_in_place(self) -> bool:
        """Whether the module may be a file the reused texts lie in: a killed run's
        module that this run continues, or an earlier module linked as this one (the
        sink's rule, see there), which it cannot be where rows are computed."""
        return self.plan.report is None or self.texts.continued

    # -- cached units

    def _feed(self, entry: Entry) -> Chunk:
        meta = entry.meta
        closed, self.closed = self.closed, []
        first = self.rows
        row = first
        for raw, batches in meta["segments"]:
            try:
                partial = loads(raw)
            except CodecError as exc:  # checksummed: only a file planted with a valid one
                raise PipelineError(
                    f"cache entry {entry.path} holds an unreadable partial ({exc}); "
                    "remove it (ashstream cache clear) and run again"
                ) from None
            if self.collector is not None:
                closed += self.collector.add(partial, row, batches)
            row += partial.rows
        self.rows += meta["rows"]
        for column, reason, n in meta["lossy"]:
            self.lossy.add(column, reason, n)
        if self.columns is None and meta.get("columns") is not None:
            self.columns = tuple(meta["columns"])
        if meta.get("first_keys") is not None:
            self.carry = meta["carry_out"]
        chunk = FileChunk(
            self._next_chunk,
            first,
            meta["rows"],
            b"",
            closed,
            file=entry.text,
            offset=entry.text_offset,
            length=entry.text_bytes,
            check=lambda: self._wait_checked(entry),
        )
        self._next_chunk += meta["chunks"]
        self.fed.append((entry, self.texts.place(self.bytes)))
        self.bytes += entry.text_bytes
        return chunk

    def lead(self) -> list[Chunk]:
        """The chunks of the cached units before the first computed one, fed now (the
        runner does it while the pool's fork server starts) rather than when the
        engine's first batch comes."""
        first = next((i for i, p in enumerate(self.plan.units) if p.entry is None), None)
        return [] if first is None else self._advance_to(first)

    def _wait_checked(self, entry: Entry) -> None:
        """Before the entry's text is used: its check's outcome.

        Raises:
            DamagedEntry: the text is not the one written (the entry is removed).
        """
        if entry.checked is None:
            return
        try:
            entry.checked.result()
        except (CorruptEntry, OSError) as exc:
            self.store.discard_entry(entry, exc)
            raise DamagedEntry(f"cache entry {entry.path} is damaged ({exc})") from None

    def _advance_to(self, stop: int) -> list[Chunk]:
        """Feed the cached units and commit the computed ones before plan unit ``stop``."""
        chunks = []
        while self.next_unit < stop:
            planned = self.plan.units[self.next_unit]
            if planned.entry is not None:
                chunks.append(self._feed(planned.entry))
            else:
                if self.current is None or self.current.planned is not planned:
                    self._start(planned)  # a unit of no rows (a where left none)
                self._commit()
            self.next_unit += 1
        return chunks

    # -- computed units

    def _start(self, planned: PlannedUnit) -> None:
        if self.row_numbers and not planned.key:
            identity = (*planned.unit.identity, self.rows)
            planned.key = hashlib.sha256(self.base + repr(identity).encode()).digest()
        offset = self.texts.place(self.bytes)
        self.current = _Computing(planned, True, dict(self.carry), offset, segment_row=self.rows)

    def _hand_over(self, unit: _Computing) -> None:
        """Give the collector the unit's batches' partials joined since the last time,
        a segment of the unit, kept as bytes for its entry first (the collector's
        merges may change the states)."""
        if unit.partial is None:
            return
        if unit.cacheable:
            try:
                unit.segments.append((dumps(unit.partial), unit.batches))
            except Exception as exc:  # a user aggregate's state the codec refuses
                unit.cacheable = False
                logger.warning("cache: a unit is not cached: %s", exc)
        partial, unit.partial = unit.partial, None
        self.closed += self.collector.add(partial, unit.segment_row, unit.batches)
        unit.segment_row, unit.batches = self.rows, 0

    def _commit(self) -> None:
        unit, self.current = self.current, None
        self._hand_over(unit)
        if unit.first_keys is not None and unit.carry_out is not None:
            self.carry = unit.carry_out
        if not unit.cacheable:
            return
        meta = {
            "rows": unit.rows,
            "chunks": unit.chunks,
            "lossy": unit.lossy,
            "columns": list(self.columns or self.stream_columns() or ()),
            "first_keys": unit.first_keys,
            "carry_used": effective_carry(unit.carry_in, unit.first_keys, self.levels),
            "carry_out": self.carry,
            "segments": unit.segments,
        }
        try:
            self.texts.sync()
        except OSError as exc:
            logger.warning("cache: a unit is not cached: %s", exc)
            return
        self.committer.submit(self._put, unit, meta)

    def _put(self, unit: _Computing, meta: dict) -> None:
        """(In the committer.) Commit the unit's entry."""
        try:
            self.store.put(
                unit.planned.key,
                self.report_id,
                self.texts.name,
                unit.offset,
                unit.text_bytes,
                unit.text_crc,
                dumps(meta),
            )
        except Exception as exc:  # in the committer: nothing else would see it
            logger.warning("cache: a unit is not cached: %s", exc)
            logger.debug("the unit that is not cached", exc_info=True)

    def take(self, done: EncodedBatch) -> list[Chunk]:
        index, carry = loads(done.mark) if done.mark is not None else (0, None)
        planned = next(p for p in self.plan.units if p.stream_index == index)
        stop = self.plan.units.index(planned)
        chunks = self._advance_to(stop)
        if self.current is None or self.current.planned is not planned:
            self._start(planned)
        unit = self.current
        if unit.first_keys is None and done.partial is not None:
            unit.first_keys = _first_keys(done.partial, self.levels)
        elif unit.first_keys is None:
            unit.first_keys = ()
        if carry is not None:
            unit.carry_out = carry
        if unit.cacheable:
            try:
                self.texts.add(done.text)
                crc = crc32(done.text) if done.text_crc is None else done.text_crc
                unit.text_crc = crc32_combine(unit.text_crc, crc, len(done.text))
                unit.text_bytes += len(done.text)
            except OSError as exc:
                unit.cacheable = False
                logger.warning("cache: cannot keep a unit's text (%s); the run goes on", exc)
        unit.rows += done.rows
        unit.chunks += len(done.chunk_ends)
        if done.partial is not None:  # the collector takes it with a segment (_hand_over)
            if unit.partial is None:
                unit.partial = done.partial
            else:
                unit.partial = join_partials(self.collector.analysis, unit.partial, done.partial)
            unit.batches += 1
        unit.lossy.extend(done.lossy)
        self.computed_rows += done.rows
        chunks += super().take(dataclasses.replace(done, partial=None))
        if unit.batches >= SEGMENT_BATCHES:
            self._hand_over(unit)
        if self.closed and chunks:  # after the groups of the units fed before these rows
            chunks[-1].groups.extend(self.closed)
            self.closed = []
        return chunks

    def finish(self) -> None:
        """The stream's end: its last units are complete (they are committed later,
        with the cached units after them, by :meth:`rest`); the collector takes the
        last one's partial now, so that what it finds wrong fails the stream."""
        if self.current is not None:
            self._hand_over(self.current)

    def rest(self) -> Iterator[Chunk]:
        """The cached units after the stream's (all of them without a stream), one at a
        time (the copy of one overlaps the check of the next), then the end of the
        run's merge."""
        while self.next_unit < len(self.plan.units):
            yield from self._advance_to(self.next_unit + 1)
        self.committer.shutdown(wait=True)  # every entry committed
        self.finished = FinishedRun(
            self.report_id, {p.key for p in self.plan.units}, self.plan.began
        )
        super().finish()
        self.final_groups[:0] = self.closed  # by the last unit, if no chunk came after it
        self.closed = []

    def close(self) -> None:
        """The run's end, whatever it was: the committer stops (entries being committed
        are, those queued are dropped)."""
        self.committer.shutdown(wait=True, cancel_futures=True)

    def repoint(self, module_linked: bool) -> None:
        """Once the module is finished: point the reused entries at their copies in
        it (see the class's docstring), unless it is an earlier file, linked
        (``module_linked``); an entry that cannot be rewritten keeps its old place."""
        if module_linked or not self.texts.linked or not self.fed:
            return
        try:
            self.texts.sync()
            for entry, offset in self.fed:
                if (entry.text_name, entry.text_offset) == (self.texts.name, offset):
                    continue  # in the module it continued (CachePlan.continued_text)
                self.store.put(
                    entry.key,
                    self.report_id,
                    self.texts.name,
                    offset,
                    entry.text_bytes,
                    entry.text_crc,
                    entry.raw_meta,
                )
        except OSError as exc:
            logger.warning("cache: entries keep their earlier texts (%s)", exc)


class CachedStream:
    """What the runner iterates in a cached run, as it would an engine's stream: the
    chunks of the cached units before the first computed one (:meth:`CacheMerge.lead`),
    those of the computed units (with the cached ones fed between them by the merge),
    then the cached units after them."""

    def __init__(self, merge: CacheMerge, handle: Any, lead: list[Chunk] | None = None) -> None:
        self.merge = merge
        self.handle = handle  # the engine's stream of the computed units, or None
        self.lead = collections.deque(lead or ())  # the cached units' chunks before it
        if handle is not None:
            merge.stream_columns = lambda: handle.columns
        self.peak_memory_bytes = 0
        self.read_on = None

    def __iter__(self) -> Iterator[Chunk]:
        while self.lead:  # popped: a chunk yielded is not held here
            yield self.lead.popleft()
        if self.handle is not None:
            yield from self.handle
        yield from self.merge.rest()
        if self.handle is None:
            from ashstream.chunks import unshared_memory_bytes

            self.peak_memory_bytes = unshared_memory_bytes()
        else:
            self.peak_memory_bytes = getattr(self.handle, "peak_memory_bytes", 0)

    @property
    def columns(self) -> tuple[str, ...] | None:
        columns = self.handle.columns if self.handle is not None else None
        return columns or self.merge.columns

    @property
    def total_rows(self) -> int | None:
        plan = self.merge.plan
        if self.merge.report.source.where is None and all(
            p.unit.rows is not None or p.entry is not None for p in plan.units
        ):
            return sum(p.entry.rows if p.entry else p.unit.rows for p in plan.units)
        return None

    @property
    def summary(self) -> Any:
        return self.merge.summary

    @property
    def lossy(self) -> Any:
        return self.merge.lossy

    @property
    def skipped(self) -> list[tuple[int, int]]:
        return self.handle.skipped if self.handle is not None else []

    def cache_facts(self) -> dict[str, Any]:
        """The summary's ``cache``: rows reused and computed, and how units were cut."""
        return {
            "reused_rows": self.merge.rows - self.merge.computed_rows,
            "computed_rows": self.merge.computed_rows,
            "mode": self.merge.plan.mode,
        }


def _first_keys(partial: Any, levels: dict[str, int]) -> tuple:
    """The key path of a batch's first row, as deep as a running variable resets."""
    depth = max(levels.values(), default=0)
    if not depth or not partial.levels:
        return ()
    return tuple(partial.levels[depth - 1].keys[0])


__all__ = [
    "CacheMerge",
    "CachePlan",
    "CacheStore",
    "DamagedEntry",
    "default_cache_dir",
    "fingerprint",
    "plan_run",
]
