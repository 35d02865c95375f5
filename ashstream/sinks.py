"""Outputs: the Typst data module, written as chunks arrive, and the PDF compiled from it.

Both are written to a temporary file beside the target and renamed into place only on
success, so a failed or interrupted run never leaves a half-written file. Output folders
may be shared with other users, so a temporary file is created new (``O_EXCL``, never
through a link) under a name no one can guess, and the rename replaces whatever is at
the target rather than writing through it. A run killed with SIGKILL cannot remove its
temporary files; the next run writing the same file does.

The module defines ``rows``, ``groups`` (nested by level), ``totals``, ``charts`` and
``meta``. Groups are written to a second, anonymous temporary file as they close, so
memory does not grow with their number, and copied into the module at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ashstream import __version__
from ashstream.analysis.aggregate import ClosedGroup, Summary
from ashstream.chunks import Chunk, FileChunk
from ashstream.encode import EncodeOptions, encode_value
from ashstream.errors import SinkError
from ashstream.procs import pid_alive
from ashstream.report import Report, option_items
from ashstream.templates import default_template

PDF_TIMESTAMP = 0  # a fixed creation date makes the PDF reproducible byte for byte
# The Typst package (namespace, name, version) a user template imports its data from.
DATA_PACKAGE = ("ashstream", "data", "0.0.0")

# What follows ".NAME." in the name of a temporary file of ours: the writer's pid and
# mkstemp's 8 random characters; or, as earlier versions named them, the pid, ".tmp"
# and ".groups" for the module's second file or ".preview" for a template's data.
_TEMP_SUFFIX = re.compile(r"(?P<pid>[0-9]+)\.(?:[a-z0-9_]{8}\.tmp|tmp(?:\.groups|\.preview)?)")


def _temp_beside(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file beside ``path``, open for writing, and its name.

    mkstemp creates it with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name, so a
    link someone planted in a shared folder is never written through; the pid in the
    name lets a later run recognise a killed run's file (:func:`_remove_stale_temps`).
    """
    prefix = f".{path.name}.{os.getpid()}."
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    return os.fdopen(fd, "wb"), Path(name)


@functools.cache
def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere only setting it returns
    it, and a thread creating a file meanwhile gets the stricter 077 rather than 0."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _close_with_plain_mode(file: BinaryIO) -> None:
    """Close a temporary file with the mode a plain ``open`` would have given the output
    (mkstemp makes it 0600): through the descriptor, as a name can be swapped."""
    os.fchmod(file.fileno(), 0o666 & ~_umask())
    file.close()


def _write_beside(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file renamed over it: the rename replaces a
    link at ``path`` instead of writing to where it points."""
    file, tmp = _temp_beside(path)
    try:
        with file:
            file.write(data)
            _close_with_plain_mode(file)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _one_line(literal: str) -> str:
    """``literal``, a Typst string literal, with every unprintable character escaped:
    ``encode_value`` leaves U+0085, U+2028 and U+2029 raw, and each of them ends a
    ``//`` comment as a newline does."""
    return "".join(c if c.isprintable() else f"\\u{{{ord(c):x}}}" for c in literal)


@contextlib.contextmanager
def _os_errors(message: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn an OSError (a full disk, a file-size limit, an I/O error) into a one-line
    SinkError ``"MESSAGE: reason"``, after ``cleanup`` has removed the temporary files:
    the user gets a message and exit code 1, not a traceback and a stray file."""
    try:
        yield
    except OSError as exc:
        if cleanup is not None:
            cleanup()
        raise SinkError(f"{message}: {exc.strerror or exc}") from None


def _unlink_quietly(path: Path) -> None:
    """Remove a file if it is there; cleanup after an error must not raise a second one."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _close_quietly(file: BinaryIO | None) -> None:
    """Close a file whose unwritten buffer may fail to flush again (a full disk)."""
    if file is not None and not file.closed:
        with contextlib.suppress(OSError):
            file.close()  # closes the descriptor even when the flush fails


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of ``path`` that a run killed with SIGKILL (which no
    cleanup survives) left beside it: only regular files of this user, of this very name,
    whose writer's process is gone; never a live run's, another user's or a link."""
    prefix = f".{path.name}."
    try:
        entries = [e.name for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return  # the folder's own errors are reported when the file is written
    for name in entries:
        match = _TEMP_SUFFIX.fullmatch(name[len(prefix) :])
        pid = int(match["pid"]) if match else 0
        if 0 < pid < 2**31 and not pid_alive(pid) and _own_file(path.parent / name):
            _unlink_quietly(path.parent / name)  # pid: a pid_t; any other is not ours


def _own_file(path: Path) -> bool:
    """Whether ``path`` itself, not what a link there points to, is this user's file."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()


def _prepare_dir(path: Path) -> None:
    """Create ``path``'s folder and clear its stale temporary files."""
    with _os_errors(f"cannot create the folder for {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise SinkError(f"cannot write {path}: the folder {path.parent} is not writable")
    _remove_stale_temps(path)


def module_meta(report: Report, columns: tuple[str, ...], row_count: int, rows_shown: int) -> dict:
    return {
        "name": report.name,
        "title": report.title,
        "params": dict(report.param_values),
        "columns": list(columns),
        "row_count": row_count,
        "rows_shown": rows_shown,
        "detail": report.output.detail,
        "groups": [g.name for g in report.groups],
        "variables": [
            {
                "name": v.name,
                "function": v.function,
                "field": v.field if not v.fields else list(v.fields),
                "reset": v.reset,
                **({"options": option_items(v.function, v.options)} if v.factory else {}),
                **({} if v.factory else option_items(v.function, v.options)),
            }
            for v in report.variables
        ],
        "ashstream_version": __version__,
    }


class GroupWriter:
    """Closed groups, in the order they close, as the text of nested Typst dictionaries.

    A group's text opens when its first sub-group closes (its key and first row are known
    then) and closes with its own variables, so no group is held in memory::

        (level: "region", key: "east", first_row: 0, groups: (
          (level: "month", key: ..., first_row: 0, last_row: 9, rows: 10,
           variables: (...), groups: ()),
        ), last_row: 41, rows: 42, variables: (region_total: ...)),
    """

    def __init__(self, out: BinaryIO, names: tuple[str, ...], options: EncodeOptions) -> None:
        self.out = out
        self.names = names  # the groups' names, outermost first
        self.depth = len(names)
        self.options = options
        self.open_levels = 0  # outer groups whose text is open, outermost first

    def _value(self, value: object) -> str:
        return encode_value(value, options=self.options)

    def _head(self, level: int, key: object, first_row: int) -> str:
        name = self._value(self.names[level - 1])
        return f"(level: {name}, key: {self._value(key)}, first_row: {first_row}, "

    def write(self, group: ClosedGroup) -> None:
        tail = (
            f"last_row: {group.last_row}, rows: {group.rows}, "
            f"variables: {self._value(group.variables)}"
        )
        if group.level < self.depth:  # an outer group: its text is open
            self.open_levels -= 1
            self.out.write(f"), {tail}),\n".encode())
            return
        while self.open_levels < group.level - 1:  # its outer groups start here
            self.open_levels += 1
            head = self._head(self.open_levels, group.keys[self.open_levels - 1], group.first_row)
            self.out.write(f"{head}groups: (\n".encode())
        head = self._head(group.level, group.key, group.first_row)
        self.out.write(f"{head}{tail}, groups: ()),\n".encode())


class TypstModuleSink:
    """A ``.typ`` module defining ``rows``, ``groups``, ``totals``, ``charts`` and ``meta``,
    for ``#import "x.typ": rows, groups, totals, charts, meta``.

    Memory stays constant: chunks and closed groups are written as they arrive.
    ``preview_rows`` keeps the first rows' text for a PDF that shows only part of a large
    table.

    Rows whose text lies in a file (a cache's, :class:`~ashstream.chunks.FileChunk`) are
    copied in the kernel. While every chunk so far is such, all in one file, in order,
    from where the module's own rows start, the copy waits: when that file proves to be
    this module byte for byte (an earlier run's module, the cache's text of it), it
    becomes the module by a hard link, and nothing is copied.
    """

    def __init__(self, path: str | os.PathLike, report: Report, preview_rows: int = 0) -> None:
        self.path = Path(path)
        self.report = report
        self.preview_rows = preview_rows
        self.preview: list[bytes] = []  # text of the first preview_rows rows
        self._preview_count = 0
        self._rows = 0
        self._tmp: Path | None = None  # the module's temporary name, from open()
        self._file: BinaryIO | None = None
        self._groups_file: BinaryIO | None = None
        self._groups: GroupWriter | None = None
        self._summary = Summary([], {}, {})
        self._options = EncodeOptions(timezone=report.pipeline.timezone)
        self._head = b""  # the module's first line and the rows' opening
        self._in_place: _TextInPlace | None = None  # rows whose copy waits
        self._wrote_rows = False  # rows' text was written here: it is not another file's
        self._hold_for_link = True  # False: rows from a file are copied as they come
        self._linked = False  # the module is another file, linked (see _link_in_place)
        self._behind: _WriteBehind | None = None  # the module's write-back, begun as it grows
        self._left_over = 0  # the end of what a killed run wrote past its units (continue_in)

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """Every write to the module goes through this: an OSError becomes a SinkError
        naming the module, and the temporary files are removed."""
        return _os_errors(f"cannot write {self.path}", self.abort)

    def open(self) -> None:
        _prepare_dir(self.path)
        _drop_cached_pages(self.path)
        with self._writing():
            self._file, self._tmp = _temp_beside(self.path)
            # anonymous: no name to plant a link at, none left behind (closed in commit/abort)
            self._groups_file = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115
            names = tuple(g.name for g in self.report.groups)
            self._groups = GroupWriter(self._groups_file, names, self._options)
            origin = _one_line(encode_value(str(self.report.path)))
            head = (
                f"// Generated by ashstream {__version__} from {origin}; "
                "do not edit.\n#let rows = (\n".encode()
            )
            self._file.write(head)
            self._head = head
            self._behind = _WriteBehind(self._file.fileno(), os.path.lexists(self.path))

    @property
    def module_file(self) -> BinaryIO:
        """The module being written, under its temporary name (a cache links it)."""
        return self._file

    @property
    def module_head(self) -> bytes:
        return self._head

    @property
    def text_start(self) -> int:
        """Where the rows' text starts, after :attr:`module_head`."""
        return len(self._head)

    def continue_in(self, file: BinaryIO, end: int) -> bool:
        """Make ``file`` the module, from ``end``: a killed run's module, whose rows'
        text so far is what the first chunks bring (they are then not copied). Its
        own name is the cache's: it takes the temporary name of the module begun.
        Whether it did (not where it cannot be linked beside the module: another file
        system; nothing is changed then)."""
        link = self._tmp.with_name(self._temp_name())
        try:
            fd = os.open(f"/proc/self/fd/{file.fileno()}", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        module = os.fdopen(fd, "wb")
        try:
            link_open_file(fd, link)
        except OSError:
            module.close()
            return False
        with self._writing():
            try:
                os.replace(link, self._tmp)
                os.fchmod(fd, 0o666 & ~_umask())
                # what the killed run wrote of its last unit is written over, and cut
                # in finish() if the module ends before it: a truncate now would make
                # XFS flush the whole module as it is closed
                self._left_over = os.fstat(fd).st_size
                module.seek(end)
            except BaseException:
                module.close()
                _unlink_quietly(link)
                raise
            self._file.close()
            self._file = module
            self._in_place = _TextInPlace(file, self.text_start, in_module=end)
            self._behind.close()
            # the killed run's writes may be dirty yet
            self._behind = _WriteBehind(fd, os.path.lexists(self.path), end)
        return True

    @property
    def linked(self) -> bool:
        """Whether the finished module is an earlier file, linked (nothing copied)."""
        return self._linked

    def copy_as_fed(self) -> None:
        """Copy rows from a file as they come rather than hold them for a link: the
        run computes rows too, so the module is no earlier file (each copy then
        overlaps the check of the texts after it)."""
        self._hold_for_link = False

    def write(self, chunk: Chunk) -> None:
        with self._writing():
            if isinstance(chunk, FileChunk):
                chunk.check_text()
                if not self._keep_in_place(chunk):
                    self._copy_from(chunk.file.fileno(), chunk.offset, chunk.length)
            else:  # from where the engine holds it: a large write skips the file's buffer
                self._end_in_place()
                self._file.write(chunk.view())
                self._wrote_rows = True
                self._behind.wrote(self._file.raw.tell())
            for group in chunk.groups:
                self._groups.write(group)
        self._rows += chunk.num_rows
        if self._preview_count < self.preview_rows:
            take = min(chunk.num_rows, self.preview_rows - self._preview_count)
            full = chunk.read_text() if isinstance(chunk, FileChunk) else chunk.text
            text = full if take == chunk.num_rows else _first_rows(full, take)
            self.preview.append(text)
            self._preview_count += take

    @property
    def rows(self) -> int:
        return self._rows

    def _keep_in_place(self, chunk: FileChunk) -> bool:
        """Whether the chunk's copy can wait (see the class's docstring)."""
        if not chunk.length:
            return True
        place = self._in_place
        if place is None:
            if self._wrote_rows or not self._hold_for_link or chunk.offset != self.text_start:
                return False
            self._in_place = place = _TextInPlace(chunk.file, chunk.offset)
        elif chunk.file is not place.source or chunk.offset != place.end:
            self._end_in_place()
            return False
        place.end += chunk.length
        return True

    def _copy_from(self, source: int, offset: int, length: int) -> None:
        self._file.flush()
        fd = self._file.fileno()
        _copy_range(source, offset, length, fd)
        self._behind.wrote(self._file.seek(os.lseek(fd, 0, os.SEEK_CUR)))  # the buffer's too
        self._wrote_rows = True

    def _end_in_place(self) -> None:
        """Copy the rows whose copy waited (unless they are in the module already)."""
        place, self._in_place = self._in_place, None
        if place is not None:
            try:
                if place.in_module is None:
                    self._copy_from(place.fd, place.start, place.end - place.start)
                elif place.end != place.in_module:
                    raise SinkError(
                        f"internal error: {place.end - place.start:,} bytes of rows came "
                        f"before the first computed unit, not {place.in_module - place.start:,}"
                    )
                else:
                    self._wrote_rows = True
            finally:
                place.close()

    def finish(self, columns: tuple[str, ...], summary: Summary | None = None) -> None:
        """Write the groups, totals, charts and ``meta``, and close the file, still under
        its temporary name."""
        meta = module_meta(self.report, columns, self._rows, self._rows)
        with self._writing():
            if summary is not None:
                self._summary = summary
                for group in summary.groups:
                    self._groups.write(group)
            place = self._in_place
            if place is not None and place.in_module is None and self._link_in_place(meta):
                return
            self._end_in_place()
            self._write_rest(meta)
            if self._file.tell() < self._left_over:
                self._file.truncate()  # a killed run's bytes past the module's end
            self._file.flush()
            self._behind.wrote(self._file.tell(), last=True)
            _close_with_plain_mode(self._file)

    def _write_rest(self, meta: dict) -> None:
        """What follows the rows."""
        self._file.write(b")\n")
        self._groups_file.seek(0)
        self._file.write(b"#let groups = (\n")
        shutil.copyfileobj(self._groups_file, self._file)
        self._file.write(b")\n" + self._results() + b"#let meta = ")
        self._file.write(encode_value(meta).encode() + b"\n")

    def _link_in_place(self, meta: dict) -> bool:
        """Make the file holding every row the module, if it is this module byte for
        byte (its first line and what follows the rows too); whether it was."""
        place = self._in_place
        self._write_rest(meta)
        self._file.flush()
        start = self.text_start
        rest = self._file.tell() - start
        mine = self._file.fileno()
        theirs = os.fstat(place.fd)
        try:
            here = os.stat(self.path, follow_symlinks=False)
            same = (here.st_dev, here.st_ino) == (theirs.st_dev, theirs.st_ino)
        except OSError:
            same = False
        alone = theirs.st_nlink == 1 or same  # outputs never share a file
        if (
            alone
            and theirs.st_size == place.end + rest
            and _same_bytes(place.fd, 0, mine, 0, start)
            and _same_bytes(place.fd, place.end, mine, start, rest)
        ):
            link = self._tmp.with_name(self._temp_name())
            try:
                link_open_file(place.fd, link)
            except OSError:  # /proc unmounted, or its last name is gone: copied
                pass
            else:
                os.fchmod(place.fd, 0o666 & ~_umask())  # as a module written now
                os.replace(link, self._tmp)
                self._linked = True
                self._file.close()
                self._in_place = None
                place.close()
                return True
        self._file.truncate(start)  # the rows go first
        self._file.seek(start)
        return False

    def _temp_name(self) -> str:
        """A new temporary name beside the module, as mkstemp would name it (a killed
        run's is removed as its other files are)."""
        return f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"

    def _results(self) -> bytes:
        totals = encode_value(self._summary.totals, options=self._options)
        charts = encode_value(self._summary.charts, options=self._options)
        return f"#let totals = {totals}\n#let charts = {charts}\n".encode()

    @property
    def written_path(self) -> Path:
        """Where the finished module is now: its temporary name until :meth:`commit`."""
        return self._tmp

    def commit(self) -> None:
        """Give the finished module its real name."""
        if self._behind is not None:
            self._behind.close()  # the rename then has none of it to do
        with self._writing():
            os.replace(self._tmp, self.path)
            if self._linked:  # an earlier module, as it was: dated now
                if os.path.lexists(self._tmp):  # it was at the path already: not moved
                    os.unlink(self._tmp)
                os.utime(self.path, follow_symlinks=False)
        self._close_groups()

    def abort(self) -> None:
        """Remove the temporary files; never raises, as it runs while an error or an
        interrupt is already on its way to the user."""
        _close_quietly(self._file)
        if self._behind is not None:
            self._behind.close(abandon=True)
        if self._in_place is not None:
            self._in_place.close()
            self._in_place = None
        if self._tmp is not None:
            _unlink_quietly(self._tmp)
        self._close_groups()

    def _close_groups(self) -> None:
        _close_quietly(self._groups_file)

    def preview_module(self, columns: tuple[str, ...]) -> bytes:
        """A module with the first ``preview_rows`` rows, every group, the totals and
        charts, and ``meta`` saying how many rows it shows."""
        meta = module_meta(self.report, columns, self._rows, self._preview_count)
        with self._writing():
            self._groups_file.seek(0)
            groups = self._groups_file.read()
        return (
            b"#let rows = (\n"
            + b"".join(self.preview)
            + b")\n#let groups = (\n"
            + groups
            + b")\n"
            + self._results()
            + b"#let meta = "
            + (encode_value(meta).encode() + b"\n")
        )


class _TextInPlace:
    """Rows of a module whose copy waits: ``end - start`` bytes at ``start`` of
    ``source`` (see :class:`TypstModuleSink`), held by a descriptor of its own (the
    cache closes its file before the module is finished)."""

    def __init__(self, source: BinaryIO, start: int, in_module: int | None = None) -> None:
        self.source = source
        self.fd = os.dup(source.fileno())
        self.start = self.end = start
        self.in_module = in_module  # the module is ``source``: its rows end there

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def link_open_file(fd: int, path: Path) -> None:
    """Give the open file ``fd`` the new name ``path``: the file itself, whatever its
    names now are (linkat, following /proc's link; plain ``link`` would not follow it).

    Raises:
        OSError: /proc is not there, the file has no name left, ``path`` exists or is on
            another file system.
    """
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder)
    finally:
        os.close(folder)


def _same_bytes(a: int, a_offset: int, b: int, b_offset: int, length: int) -> bool:
    """Whether ``length`` bytes of two files at those offsets are the same."""
    step = 2**20
    for done in range(0, length, step):
        n = min(step, length - done)
        if os.pread(a, n, a_offset + done) != os.pread(b, n, b_offset + done):
            return False
    return True


COPY_STEP = 2**26  # the copy drops each 64 MiB of the source's pages once copied


def _drop_cached_pages(path: Path) -> None:
    """Drop the cached pages of the file at ``path``, which the module will replace,
    as the run starts: the memory they free is what the module's writes take next, and
    they are the first pages worth freeing. Fresh memory costs a VM's writes more than
    the copy itself (see :func:`_copy_range`): a run after a killed one over
    ``benchmarks/bench_cache.py``'s 10M rows streamed in 4.3 s instead of 5.2 s. Only
    a file with no other name: a cache's text, which the run may read, has two."""
    if not hasattr(os, "posix_fadvise"):
        return

    def alone(info: os.stat_result) -> bool:  # and this user's: no one else's to drop
        return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid()

    try:
        if not alone(os.stat(path, follow_symlinks=False)):
            return  # a link, a FIFO, a device or a cache's text: not opened
        # not blocking, not through a link: what is there may have changed since
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(path, flags)
    except OSError:
        return  # none, or not ours to read: nothing to drop
    try:
        if alone(os.fstat(fd)):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # only a hint
    finally:
        os.close(fd)


WRITE_BEHIND_BYTES = 2**26  # the module's write-back is asked for each 64 MiB written
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start the write-out, wait for nothing
_EXT_SUPER_MAGIC = 0xEF53  # <linux/magic.h>: ext2, ext3 and ext4


@functools.cache
def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A call of libc's that Python's os does not offer (Linux's), or None."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call


def _sync_file_range() -> Callable[..., int] | None:
    return _libc(
        "sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint
    )


def _starts_write_back_in_rename(fd: int) -> bool:
    """Whether the file system of ``fd`` starts the write-back of a file renamed over
    another in the rename: ext4 does (``auto_da_alloc``, on unless mounted without)."""
    fstatfs = _libc("fstatfs", ctypes.c_int, ctypes.c_char_p)
    info = ctypes.create_string_buffer(512)  # a struct statfs, f_type (a long) first
    if fstatfs is None or fstatfs(fd, info) != 0:
        return False
    return ctypes.c_long.from_buffer(info).value == _EXT_SUPER_MAGIC


class _WriteBehind:
    """Starts the write-back of the module's pages behind its writes, from a thread of
    its own (each call waits for the disk's queue only, the thread holds a descriptor
    of its own), where the file system would start it in the rename of a file that
    replaces another, at the very end of the run: ext4 (its ``auto_da_alloc``), 0.3 s
    per GB still dirty (the rename of benchmarks/bench_cache.py's 3.9 GB module: 0.73
    s, 0.11 s with this). Elsewhere it would only move into the run what the kernel
    does after it (on XFS a re-run after a kill took 0.3 s longer)."""

    def __init__(self, fd: int, replaces: bool, written: int = 0) -> None:
        self._call = _sync_file_range()
        self._asked = 0  # the bytes from the start whose write-back was asked for
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._abandoned = False
        if not replaces or self._call is None or not _starts_write_back_in_rename(fd):
            return  # ext4 starts it in the rename only where a file is replaced
        self._fd = os.dup(fd)
        thread = threading.Thread(
            target=self._run,
            name="ashstream-write-behind",
            daemon=True,  # a sink never closed; one abandoned
        )
        try:
            thread.start()
        except BaseException:
            os.close(self._fd)
            raise
        self._thread = thread
        self.wrote(written)

    def wrote(self, end: int, last: bool = False) -> None:
        """The module holds ``end`` bytes; ``last``: all of them."""
        if self._thread is not None and (end - self._asked >= WRITE_BEHIND_BYTES or last):
            self._ranges.put((self._asked, end - self._asked))
            self._asked = end

    def _run(self) -> None:
        try:
            while (asked := self._ranges.get()) is not None:
                if self._abandoned:
                    continue
                if self._call(self._fd, *asked, _SYNC_FILE_RANGE_WRITE) != 0:
                    self._abandoned = True  # an I/O error: the rename does the rest
        finally:
            os.close(self._fd)

    def close(self, abandon: bool = False) -> None:
        """Wait for the write-back asked for so far to be under way; ``abandon``: ask
        for no more and wait for nothing (the module is being removed, maybe on a
        second Ctrl-C: the thread closes its descriptor as it ends)."""
        if self._thread is not None:
            self._abandoned = self._abandoned or abandon
            self._ranges.put(None)
            if not abandon:
                self._thread.join()
            self._thread = None


def _copy_range(source: int, offset: int, length: int, target: int) -> None:
    """Append ``length`` bytes at ``offset`` of ``source`` to ``target``: in the kernel
    where it can (no copy through this process), else read and written.

    Where the file system shares blocks between files (XFS, Btrfs), the kernel shares
    them rather than copy, but only from and to block boundaries (of the target's block
    size): the bytes up to the source's next boundary go first, alone, so that where
    the target's end lies at the same place within a block (a run's reused rows start
    at the same offset in an earlier module as in this one), the rest is shared (a
    3.9 GB text in no time, against 1 s on XFS and 2.2-2.6 s on ext4, which copies
    either way).

    The source's cached pages are dropped behind the copy: a cache's text is read once,
    and the pages it frees are those the copy's writes take, so the page cache does not
    grow by the text's size. Allocating fresh pages costs more than the copy itself
    where the host reclaims a VM's free memory (0.2-0.8 GB/s against 1.6-2.2 GB/s for
    a 3.9 GB text, benchmarks/bench_cache.py's one day appended)."""
    end = offset + length
    block = os.fstat(target).st_blksize
    while offset < end:
        step = -offset % block or COPY_STEP  # to the next boundary first
        try:
            copied = os.copy_file_range(source, target, min(end - offset, step), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = 0
        if not copied:  # another file system, or none in this kernel: by hand
            piece = os.pread(source, min(end - offset, step, 2**24), offset)
            if not piece:
                raise OSError(errno.EIO, "the cache entry ended early")
            copied = os.write(target, piece)
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # only a hint
                os.posix_fadvise(source, offset, copied, os.POSIX_FADV_DONTNEED)
        offset += copied


def _first_rows(text: bytes, n: int) -> bytes:
    end = 0
    for _ in range(n):
        end = text.index(b",\n", end) + 2
    return text[:end]


def compile_pdf(
    pdf_path: str | os.PathLike,
    module: TypstModuleSink,
    columns: tuple[str, ...],
    template: str | None = None,
    every_row: bool = False,
) -> None:
    """Compile the report's PDF.

    A template finds its data with ``#import sys.inputs.data: rows, meta``: a preview
    module holding the first ``pdf_max_rows`` rows, every group, the totals and charts,
    with ``meta.rows_shown`` saying how many rows it holds. Typst needs ~4 KB and
    12-20 µs for every row it parses, and ~0.4 ms for a table row it lays out, so a
    million rows would take it a minute and several GiB. A user template with
    ``every_row`` (``output.template_rows: all``) reads the whole data module instead,
    still under its temporary name: the module and the PDF are renamed into place only
    when both are written.
    """
    pdf_path = Path(pdf_path)
    _prepare_dir(pdf_path)
    with (
        _os_errors(f"cannot write {pdf_path}"),
        tempfile.TemporaryDirectory(prefix="ashstream-pdf-", ignore_cleanup_errors=True) as work,
    ):
        if template is None:
            (Path(work) / "data.typ").write_bytes(module.preview_module(columns))
            pdf = _typst_pdf(default_template(), Path(work), "/data.typ", pdf_path.name)
        else:
            template_path = Path(template).resolve()
            data = _data_package(Path(work), module, columns, every_row)
            root = template_path.parent
            pdf = _typst_pdf(str(template_path), root, data, pdf_path.name, packages=Path(work))
        _write_beside(pdf_path, pdf)


def _data_package(
    packages: Path, module: TypstModuleSink, columns: tuple[str, ...], every_row: bool
) -> str:
    """Put a user template's data in a Typst package below ``packages``; its import spec.

    Typst reads a template's files only below its root, the template's folder. The data
    module lies elsewhere, and a root above both (their common folder, often ``/``)
    would let a template read any file the user can; a package is what Typst reads from
    outside the root, and it holds only the data. ``package_path`` replaces the folder
    of the user's own packages, so those are linked in beside it.
    """
    namespace, name, version = DATA_PACKAGE
    folder = packages / namespace / name / version
    folder.mkdir(parents=True)
    (folder / "typst.toml").write_text(
        f'[package]\nname = "{name}"\nversion = "{version}"\nentrypoint = "data.typ"\n'
    )
    if every_row:
        (folder / "data.typ").symlink_to(module.written_path.absolute())
    else:
        (folder / "data.typ").write_bytes(module.preview_module(columns))
    with contextlib.suppress(OSError, RuntimeError):  # no packages, or no home folder
        data_home = os.environ.get("XDG_DATA_HOME", "")  # Typst's dirs::data_dir()
        base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local/share"
        for entry in os.scandir(base / "typst" / "packages"):
            if entry.name != namespace:
                (packages / entry.name).symlink_to(entry.path)
    return f"@{namespace}/{name}:{version}"


def _typst_pdf(
    source: Any, root: Path, data: str, name: str, packages: Path | None = None
) -> bytes:
    """Typst's PDF of ``source``, which imports ``data`` (below ``root``, or a package
    in ``packages``)."""
    import typst

    try:
        return typst.compile(
            source,
            root=str(root),
            sys_inputs={"data": data},
            package_path=None if packages is None else str(packages),
            pdf_tags=False,
            timestamp=PDF_TIMESTAMP,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust panic arrives as a BaseException
        message = getattr(exc, "diagnostic", None) or str(exc)
        raise SinkError(f"Typst could not compile {name}: {message}") from None
