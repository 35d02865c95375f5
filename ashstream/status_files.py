"""Where runs say they are running, for ``ashstream status``: one 0600 JSON file per
pool in a private runtime directory of this user, removed when the pool closes (a
file whose process is gone is stale, and the next reader removes it).

The local engine's file says where its registry process listens; an engine without
one (Ray) writes its streams into the file itself, rewritten in place about once a
second.

The directory's default place, ``$TMPDIR/ashstream-<uid>`` when ``XDG_RUNTIME_DIR`` is
unset, is a name any local user can create first, or plant as a symbolic link. So the
directory is trusted only as opened (``O_NOFOLLOW``) and checked on that descriptor
(owner: this user; mode: 0700), and everything in it is reached through that
descriptor, never by a path that could be swapped in between. Only files of this
module's own name pattern are read or removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ashstream.procs import pid_alive

# How often an engine that writes its streams into its file rewrites it at most.
REWRITE_INTERVAL_S = 1.0
# A status file's name: the pid of the process that wrote it, and a random tag.
STATUS_NAME = re.compile(r"(?P<pid>[0-9]{1,10})-[0-9a-f]{8}\.json")
# A status file holds a pool's streams; more than this is not one of ours.
MAX_STATUS_BYTES = 8 * 2**20


class UntrustedDirectory(PermissionError):
    """The runtime directory is not this user's private directory (planted, a link)."""


def runtime_dir_path() -> str:
    """Where this user's status directory is (whether or not it exists or is trusted)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"ashstream-{os.getuid()}")


@contextlib.contextmanager
def runtime_dir() -> Iterator[int]:
    """A descriptor of this user's private status directory, created if missing.

    Raises:
        UntrustedDirectory: the name is a link, not a directory, or not private to us.
    """
    path = runtime_dir_path()
    base, name = os.path.split(path)
    base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=base_fd)
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=base_fd,
            )
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            link = stat.S_ISLNK(os.lstat(name, dir_fd=base_fd).st_mode)
            raise UntrustedDirectory(
                f"{path} is {'a symbolic link' if link else 'a file'}, not a directory; "
                "another user may have planted it: "
                "remove it, or set XDG_RUNTIME_DIR to a private directory"
            ) from None
    finally:
        os.close(base_fd)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise UntrustedDirectory(
                f"{path} belongs to uid {info.st_uid} with mode "
                f"{stat.S_IMODE(info.st_mode):04o}, not to this user (uid {os.getuid()}) "
                "with mode 0700; another user may have planted it: remove it, or set "
                "XDG_RUNTIME_DIR to a private directory"
            )
        yield fd
    finally:
        os.close(fd)


def _write_json(directory: int, name: str, info: dict[str, Any]) -> None:
    """Write ``info`` to ``name`` at once: through a temporary file renamed over it, so
    a reader sees the old or the new whole, never half a file."""
    temp = f".{name}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temp, flags, 0o600, dir_fd=directory)
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump(info, f, default=str)
        os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise


def new_status_file(info: dict[str, Any]) -> str:
    """Create this process's status file holding ``info``; its name."""
    name = f"{os.getpid()}-{secrets.token_hex(4)}.json"
    with runtime_dir() as directory:
        _write_json(directory, name, {"pid": os.getpid(), "started_at": time.time(), **info})
    return name


def rewrite_status_file(name: str, info: dict[str, Any]) -> None:
    """Replace the file's content at once."""
    with runtime_dir() as directory:
        _write_json(directory, name, info)


def remove_status_file(name: str) -> None:
    """Remove this process's status file (and a temporary one a rewrite left)."""
    with runtime_dir() as directory:
        for entry in (name, f".{name}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=directory)


def read_status_files() -> list[dict[str, Any]]:
    """The status files of live processes, oldest name first; those whose writer is
    gone are removed. A file that is not ours (wrong name, owner, type, size or
    content) is neither read nor removed.

    Raises:
        UntrustedDirectory: as :func:`runtime_dir`.
    """
    found = []
    with runtime_dir() as directory:
        for name in sorted(os.listdir(directory)):
            match = STATUS_NAME.fullmatch(name)
            writer = int(match["pid"]) if match else 0
            if not 0 < writer < 2**31:  # a pid_t; any other name is not ours
                continue
            if not pid_alive(writer):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=directory)
                continue
            info = _read_own_json(directory, name)
            if isinstance(info, dict) and info.get("pid") == writer:
                found.append(info)
    return found


def _read_own_json(directory: int, name: str) -> object:
    """The JSON in ``name``, if it is a regular file of this user of a sane size."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(name, flags, dir_fd=directory)
    except OSError:
        return None  # removed meanwhile, or a link
    with os.fdopen(descriptor, "rb") as f:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        text = f.read(MAX_STATUS_BYTES + 1)
    if len(text) > MAX_STATUS_BYTES:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
